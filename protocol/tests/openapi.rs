//! The checked-in OpenAPI document is the one the types generate.

#[test]
fn checked_in_openapi_document_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let generated = protocol::openapi::document();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("write openapi.json");
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "protocol/openapi.json is out of date with the protocol types; \
         regenerate it with `UPDATE_OPENAPI=1 cargo test -p protocol --test openapi`"
    );
}

#[test]
fn openapi_document_names_every_route() {
    let doc: serde_json::Value =
        serde_json::from_str(&protocol::openapi::document()).expect("document is JSON");
    for route in [
        "/api/v1/workers/{worker}/volumes/desired",
        "/api/v1/workers/{worker}/volumes/report",
        "/api/v1/workers/{worker}/base-resource-types",
        "/volumes",
        "/volumes/{handle}",
        "/volumes-async",
        "/volumes/destroy",
        "/volumes/{handle}/state",
        "/volumes/{handle}/properties/{key}",
        "/gc/plan",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(route).is_some(), "missing {route}");
    }
    assert!(doc["components"]["schemas"]["DesiredSet"].is_object());
}
