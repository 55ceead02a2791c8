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
    assert!(checked >= 2, "found {checked} example configs");
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
