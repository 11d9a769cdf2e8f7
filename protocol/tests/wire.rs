//! The JSON examples of the design documents round-trip, malformed input is rejected
//! with an error naming the field, and random values survive serialization.

use protocol::concourse::{DestroyingList, ReportedHandles};
use protocol::local::{
    CreateVolumeRequest, ErrorBody, SetPrivilegedRequest, SetPropertyRequest, SetStateRequest,
    Strategy as VolumeStrategy, VolumeFuture, VolumeJson,
};
use protocol::native::{DesiredSet, ResourceMetadata, ResourceTypesReport, VolumeReport};
use protocol::{decode, Handle, VolumeState};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// Decodes `json` into `T`, encodes it again and checks nothing was lost or invented.
fn round_trips<T: DeserializeOwned + Serialize>(json: &str) -> T {
    let value: T = decode("example", json.as_bytes()).expect("example decodes");
    let again: Value = serde_json::to_value(&value).expect("encodes");
    let original: Value = serde_json::from_str(json).expect("example is JSON");
    assert_eq!(
        strip_nulls(again),
        strip_nulls(original),
        "round trip of {json}"
    );
    value
}

/// Optional fields may be written as null or left out; both mean the same.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[test]
fn base_resource_types_example_round_trips() {
    let r: ResourceTypesReport = round_trips(
        r#"{"resource_types": [
          {"type": "git", "image": "/usr/share/volume-agent/resource-types/git/rootfs.tgz",
           "version": "1.17.0", "privileged": false, "unique_version_history": false}
        ]}"#,
    );
    assert_eq!(r.resource_types[0].name, "git");
}

#[test]
fn desired_set_example_round_trips() {
    let d: DesiredSet = decode(
        "desired set",
        br#"{"worker": "worker-0", "revision": 1234, "as_of": "2026-11-24T20:00:00Z",
         "volumes": [{"handle": "a1", "parent": null}, {"handle": "b2", "parent": "a1"}],
         "destroying": ["c3", "d4"]}"#,
    )
    .expect("decodes");
    assert_eq!(d.revision, 1234);
    assert_eq!(d.volumes[1].parent.as_ref().map(Handle::as_str), Some("a1"));
    assert_eq!(d.destroying.len(), 2);
    let again: DesiredSet =
        decode("desired set", &serde_json::to_vec(&d).expect("encodes")).expect("decodes");
    assert_eq!(again, d);
}

#[test]
fn desired_set_accepts_nanosecond_as_of() {
    let d: DesiredSet = decode(
        "desired set",
        br#"{"worker":"w","revision":1,"as_of":"2026-11-24T20:00:00.123456789Z","volumes":[]}"#,
    )
    .expect("Go's nanosecond timestamps decode");
    assert_eq!(d.as_of.timestamp_subsec_nanos(), 123_456_789);
    assert!(d.destroying.is_empty());
}

#[test]
fn report_example_round_trips() {
    let r: VolumeReport = round_trips(
        r#"{"revision_seen": 1234,
         "volumes": [{"handle": "a1", "parent": null, "state": "initialized"},
                     {"handle": "b2", "parent": "a1", "state": "created"}],
         "destroyed": ["c3"],
         "failed": [{"handle": "d4", "error": "device or resource busy", "attempts": 3}],
         "blocked": [{"handle": "a1", "by_children": ["b2"]}]}"#,
    );
    assert_eq!(r.failed[0].attempts, 3);
}

#[test]
fn report_with_measurements_round_trips() {
    round_trips::<VolumeReport>(
        r#"{"revision_seen": null,
         "volumes": [{"handle": "a1", "parent": null, "state": "initialized", "bytes": 4096}],
         "destroyed": [], "failed": [], "blocked": [], "missing": ["e5"],
         "disk": {"total_bytes": 100, "free_bytes": 5, "free_inodes": 7, "pressure": true}}"#,
    );
}

#[test]
fn concourse_destroying_list_accepts_null() {
    let l: DestroyingList = decode("destroying list", b"null").expect("null is []");
    assert!(l.0.is_empty());
    let l: DestroyingList = round_trips(r#"["3f0c","9a1e"]"#);
    assert_eq!(l.0.len(), 2);
    round_trips::<ReportedHandles>(r#"["a","b"]"#);
}

#[test]
fn local_create_requests_round_trip() {
    let c: CreateVolumeRequest = round_trips(
        r#"{"handle":"h1","strategy":{"type":"cow","volume":"p1"},"properties":{"k":"v"},"privileged":true}"#,
    );
    assert_eq!(c.strategy.parent().map(Handle::as_str), Some("p1"));
    round_trips::<CreateVolumeRequest>(
        r#"{"handle":"h2","strategy":{"type":"import","path":"/x/rootfs.tgz","follow_symlinks":true},"properties":{},"privileged":false}"#,
    );
    // baggageclaim's client sends null properties and omits privileged when false.
    let c: CreateVolumeRequest = decode(
        "create",
        br#"{"handle":"h3","strategy":{"type":"empty"},"properties":null}"#,
    )
    .expect("decodes");
    assert!(c.properties.is_empty() && !c.privileged);
    assert_eq!(c.strategy, VolumeStrategy::Empty);
}

#[test]
fn local_volume_json_round_trips() {
    let v: VolumeJson = round_trips(
        r#"{"handle":"a","path":"/var/lib/volume-agent/volumes/live/a/volume","state":"initialized","parent":null,"properties":{},"privileged":false}"#,
    );
    assert_eq!(v.state, VolumeState::Initialized);
}

#[test]
fn resource_metadata_example_round_trips() {
    let m: ResourceMetadata = round_trips(
        r#"{"type": "git", "version": "1.17.0", "privileged": false, "unique_version_history": false}"#,
    );
    assert_eq!((m.name.as_str(), m.version.as_str()), ("git", "1.17.0"));
}

#[test]
fn local_api_bodies_of_the_design_doc_round_trip() {
    for strategy in [
        r#"{"handle":"h","strategy":{"type":"empty"},"properties":{},"privileged":false}"#,
        r#"{"handle":"h","strategy":{"type":"cow","volume":"p"},"properties":{},"privileged":false}"#,
    ] {
        round_trips::<CreateVolumeRequest>(strategy);
    }
    for state in ["initializing", "initialized"] {
        let s: SetStateRequest = round_trips(&format!(r#"{{"state":"{state}"}}"#));
        assert_eq!(s.state.as_str(), state);
    }
    let p: SetPropertyRequest = round_trips(r#"{"value":"v1"}"#);
    assert_eq!(p.value, "v1");
    let p: SetPrivilegedRequest = round_trips(r#"{"value":true}"#);
    assert!(p.value);
    let f: VolumeFuture = round_trips(r#"{"handle":"h1"}"#);
    assert_eq!(f.handle.as_str(), "h1");
    let e: ErrorBody = round_trips(r#"{"error":"no such file or directory"}"#);
    assert_eq!(e.error, "no such file or directory");
}

#[test]
fn etag_is_quoted_once_for_if_none_match() {
    use protocol::native::quote_etag;
    assert_eq!(quote_etag("r12"), "\"r12\"");
    assert_eq!(quote_etag("\"r12\""), "\"r12\"");
    assert_eq!(quote_etag("W/\"r12\""), "W/\"r12\"");
}

#[test]
fn create_request_ignores_unknown_fields_as_go_does() {
    let req = decode::<CreateVolumeRequest>(
        "create",
        br#"{"handle":"a","strategy":{"type":"import","path":"/x","Uid":1,"Gid":2},"Uid":1,"Gid":2,"extra":[1]}"#,
    )
    .expect("unknown fields are ignored");
    assert_eq!(
        req.strategy,
        VolumeStrategy::Import {
            path: "/x".into(),
            follow_symlinks: false
        }
    );
}

fn rejection(
    what: &'static str,
    result: Result<impl std::fmt::Debug, protocol::DecodeError>,
) -> String {
    let err = result.expect_err(what);
    err.to_string()
}

#[test]
fn rejects_unknown_state_naming_the_field() {
    let msg = rejection(
        "unknown state",
        decode::<SetStateRequest>("state", br#"{"state":"exploded"}"#),
    );
    assert!(
        msg.contains("field `state`") && msg.contains("exploded"),
        "{msg}"
    );
}

#[test]
fn rejects_bad_handle_naming_the_field() {
    let msg = rejection(
        "bad handle",
        decode::<DesiredSet>(
            "desired set",
            br#"{"worker":"w","revision":1,"as_of":"2026-11-24T20:00:00Z","volumes":[{"handle":"../etc","parent":null}]}"#,
        ),
    );
    assert!(msg.contains("volumes[0].handle"), "{msg}");
}

#[test]
fn rejects_negative_revision_naming_the_field() {
    let msg = rejection(
        "negative revision",
        decode::<DesiredSet>(
            "desired set",
            br#"{"worker":"w","revision":-1,"as_of":"2026-11-24T20:00:00Z","volumes":[]}"#,
        ),
    );
    assert!(msg.contains("field `revision`"), "{msg}");
}

#[test]
fn rejects_wrong_types_naming_the_field() {
    let msg = rejection(
        "wrong type",
        decode::<VolumeReport>("report", br#"{"revision_seen":1,"volumes":"all of them"}"#),
    );
    assert!(msg.contains("field `volumes`"), "{msg}");
    let msg = rejection(
        "bad timestamp",
        decode::<DesiredSet>(
            "desired set",
            br#"{"worker":"w","revision":1,"as_of":"yesterday","volumes":[]}"#,
        ),
    );
    assert!(msg.contains("field `as_of`"), "{msg}");
    let msg = rejection(
        "unknown strategy",
        decode::<CreateVolumeRequest>("create", br#"{"handle":"a","strategy":{"type":"magic"}}"#),
    );
    assert!(msg.contains("strategy"), "{msg}");
}

mod properties {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use protocol::native::{DesiredVolume, FailedVolume, ReportedVolume};

    fn handle() -> impl Strategy<Value = Handle> {
        "[A-Za-z0-9._-]{1,128}"
            .prop_filter("not . or ..", |s| s != "." && s != "..")
            .prop_map(|s| Handle::new(s).expect("pattern matches the handle alphabet"))
    }

    fn state() -> impl Strategy<Value = VolumeState> {
        proptest::sample::select(VolumeState::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn any_string_is_a_handle_exactly_when_valid(s in ".{0,140}") {
            let valid = !s.is_empty() && s.len() <= 128 && s != "." && s != ".."
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            prop_assert_eq!(Handle::new(s.clone()).is_ok(), valid);
            let json = serde_json::to_string(&s).expect("string encodes");
            prop_assert_eq!(serde_json::from_str::<Handle>(&json).is_ok(), valid);
        }

        #[test]
        fn desired_sets_round_trip(
            worker in "[a-z0-9-]{1,20}",
            revision in any::<u64>(),
            secs in 0i64..4_000_000_000,
            nanos in 0u32..1_000_000_000,
            volumes in proptest::collection::vec((handle(), proptest::option::of(handle())), 0..20),
            destroying in proptest::collection::vec(handle(), 0..20),
        ) {
            let d = DesiredSet {
                worker,
                revision,
                as_of: Utc.timestamp_opt(secs, nanos).single().expect("valid time"),
                volumes: volumes.into_iter().map(|(handle, parent)| DesiredVolume { handle, parent }).collect(),
                destroying,
            };
            let bytes = serde_json::to_vec(&d).expect("encodes");
            prop_assert_eq!(decode::<DesiredSet>("desired set", &bytes).expect("decodes"), d);
        }

        #[test]
        fn reports_round_trip(
            revision_seen in proptest::option::of(any::<u64>()),
            volumes in proptest::collection::vec((handle(), proptest::option::of(handle()), state(), proptest::option::of(any::<u64>())), 0..20),
            destroyed in proptest::collection::vec(handle(), 0..10),
            failed in proptest::collection::vec((handle(), ".{0,30}", any::<u32>()), 0..5),
        ) {
            let r = VolumeReport {
                revision_seen,
                volumes: volumes.into_iter().map(|(handle, parent, state, bytes)| ReportedVolume { handle, parent, state, bytes }).collect(),
                destroyed,
                failed: failed.into_iter().map(|(handle, error, attempts)| FailedVolume { handle, error, attempts }).collect(),
                ..Default::default()
            };
            let bytes = serde_json::to_vec(&r).expect("encodes");
            prop_assert_eq!(decode::<VolumeReport>("report", &bytes).expect("decodes"), r);
        }
    }
}
