//! The Patroni fixture (`PatroniCluster`): a real three-node Patroni 3 cluster with the raft
//! DCS on 127.50.0.10–12. Its REST API names exactly one primary, the other nodes are
//! streaming replicas, and a switchover through the REST API moves the primary. Asserts
//! outcomes, never how fast.

use std::time::Duration;

use roleproxy_testkit::harness::eventually;
use roleproxy_testkit::patroni::PatroniCluster;
use roleproxy_testkit::writer::connect;

const WAIT: Duration = Duration::from_secs(120);
const NET: u8 = 50;

/// Exactly `leader` answers 200 on `GET /primary` and 503 on `GET /replica`; every other node
/// the reverse.
async fn assert_roles(cluster: &PatroniCluster, leader: usize) {
    let primary = cluster.status_codes("/primary").await;
    let replica = cluster.status_codes("/replica").await;
    for i in 0..cluster.len() {
        let expected = if i == leader {
            (Some(200), Some(503))
        } else {
            (Some(503), Some(200))
        };
        assert_eq!(
            (primary[i], replica[i]),
            expected,
            "{} (leader {}): GET /primary and GET /replica\n{}",
            cluster.name(i),
            cluster.name(leader),
            cluster.log_tails()
        );
    }
}

/// Whether node `i`'s Postgres is in recovery, asked with the superuser's password over TCP.
async fn in_recovery(cluster: &PatroniCluster, i: usize) -> bool {
    let client = connect(&cluster.conninfo(i))
        .await
        .expect("connects with the superuser's password");
    client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_primary_streaming_replicas_and_a_switchover() {
    let cluster = PatroniCluster::start(NET, 3).await;
    let leader = cluster.wait_replicas_streaming(WAIT).await;
    assert_roles(&cluster, leader).await;
    for i in 0..cluster.len() {
        assert_eq!(
            in_recovery(&cluster, i).await,
            i != leader,
            "{}",
            cluster.name(i)
        );
    }

    // A row written on the leader reaches the node about to be promoted.
    let to = (leader + 1) % cluster.len();
    let writer = connect(&cluster.conninfo(leader)).await.expect("leader");
    writer
        .batch_execute("CREATE TABLE marks (v text); INSERT INTO marks VALUES ('before')")
        .await
        .expect("write on the leader");
    let reader = connect(&cluster.conninfo(to)).await.expect("replica");
    assert!(
        eventually(WAIT, || async {
            reader
                .query_one("SELECT count(*) FROM marks", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        })
        .await,
        "the row never reached {}",
        cluster.name(to)
    );

    // During the switchover both may answer 503 on /primary for a moment; afterwards `to`
    // leads and the old leader streams from it.
    let answer = cluster.switchover(to).await.expect("switchover");
    assert!(answer.contains(cluster.name(to)), "{answer}");
    assert_eq!(cluster.wait_leader(WAIT).await, to, "the candidate leads");
    assert_eq!(cluster.wait_replicas_streaming(WAIT).await, to);
    assert_roles(&cluster, to).await;
    assert!(
        !in_recovery(&cluster, to).await,
        "the new leader is writable"
    );
    assert!(
        in_recovery(&cluster, leader).await,
        "the old leader is a replica"
    );
    let new_leader = connect(&cluster.conninfo(to)).await.expect("new leader");
    let row = new_leader
        .query_one("SELECT v FROM marks", &[])
        .await
        .expect("the row is on the new leader");
    assert_eq!(row.get::<_, String>(0), "before");
    new_leader
        .batch_execute("INSERT INTO marks VALUES ('after')")
        .await
        .expect("the new leader takes writes");
    cluster.shutdown().await;
}
