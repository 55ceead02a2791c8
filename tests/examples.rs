//! Every configuration under `examples/` parses, with the variables it names set.

use roleproxy::Config;

fn env(name: &str) -> Option<String> {
    match name {
        "PRIMARY_REGION" => Some("iad".into()),
        "FLY_APP_NAME" => Some("app".into()),
        "PG_LISTEN_ADDRESS" => Some("fdaa::7".into()),
        "DB_NODES_NAME" => Some("db.example.internal".into()),
        _ => None,
    }
}

#[test]
fn every_example_config_parses() {
    let mut checked = 0;
    for entry in std::fs::read_dir("examples").expect("examples/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        if let Err(e) = Config::parse(&text, &env) {
            panic!("{} does not parse: {e}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 4, "found {checked} example configs");
}

#[test]
fn flex_example_finds_leaders_in_any_region_by_the_word_primary() {
    let text = std::fs::read_to_string("examples/fly-postgres-flex.toml").expect("example");
    let config = Config::parse(&text, &env).expect("parses");
    assert_eq!(
        config.backends.dns_names,
        vec!["iad.app.internal", "app.internal"]
    );
    assert_eq!(config.check.leader, vec!["primary"]);
}

#[test]
fn postgres_ha_example_serves_the_leader_and_forwards_5433_to_the_local_node() {
    use roleproxy::config::Serves;
    let text = std::fs::read_to_string("examples/fly-postgres-ha.toml").expect("example");
    let config = Config::parse(&text, &env).expect("parses");
    let all = config.all_listeners();
    assert_eq!(all[0].serves, Serves::Leader);
    assert_eq!(all[0].addresses[0].port(), 5432);
    let local = all
        .iter()
        .find(|l| l.name == "local")
        .expect("a local listener");
    assert_eq!(local.addresses[0].port(), 5433);
    assert_eq!(
        local.serves,
        Serves::Target("[fdaa::7]:5433".parse().expect("address"))
    );
    assert_eq!(config.check.leader, vec!["leader"]);
}

#[test]
fn patroni_example_uses_the_rest_api_and_the_conventional_ports() {
    use roleproxy::config::{CheckKind, Serves};
    let text = std::fs::read_to_string("examples/patroni.toml").expect("example");
    let config = Config::parse(&text, &env).expect("parses");
    assert_eq!(config.check.kind, CheckKind::HttpStatus);
    assert_eq!(config.check.port, 8008);
    let all = config.all_listeners();
    assert_eq!(all[0].addresses[0].port(), 5000);
    let replicas = all
        .iter()
        .find(|l| matches!(l.serves, Serves::Replica { .. }))
        .expect("a replica listener");
    assert_eq!(replicas.addresses[0].port(), 5001);
}
