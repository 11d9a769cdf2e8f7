//! The real agent against a wiremock ATC: the Concourse dialect.

use e2e::wiremock::matchers::{method, path, query_param};
use e2e::wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};
use e2e::*;
use std::sync::{Arc, Mutex};

/// The ATC's destroying list, changeable by the test; `None` answers `null`.
#[derive(Clone, Default)]
struct Destroying(Arc<Mutex<Option<Vec<String>>>>);

impl Destroying {
    fn set(&self, handles: Option<&[&str]>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            handles.map(|h| h.iter().map(|s| s.to_string()).collect());
    }
}

impl Respond for Destroying {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let list = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ResponseTemplate::new(200).set_body_json(&list)
    }
}

async fn atc(destroying: &Destroying) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/api/v1/volumes/destroying"))
        .and(query_param("worker_name", "w1"))
        .respond_with(destroying.clone())
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path("/api/v1/volumes/report"))
        .and(query_param("worker_name", "w1"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&server)
        .await;
    server
}

fn settings() -> AgentSettings {
    AgentSettings {
        dialect: "concourse",
        unknown_grace: "1ms",
        ..AgentSettings::default()
    }
}

/// The handle arrays the ATC received, in order.
async fn reported(server: &MockServer) -> Vec<Vec<String>> {
    requests_to(server, "/volumes/report")
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<Vec<String>>(&r.body).ok())
        .map(|mut v| {
            v.sort();
            v
        })
        .collect()
}

#[tokio::test]
async fn null_destroying_list_destroys_nothing_even_unknown_volumes() {
    let list = Destroying::default();
    let server = atc(&list).await;
    let agent = Agent::start(&server.uri(), &settings());
    let local = Local::new(&agent);
    local.make("mine", None).await;
    eventually("a report listing the volume", || async {
        reported(&server).await.iter().any(|r| r == &["mine"])
    })
    .await;
    let polls = requests_to(&server, "/volumes/destroying").await.len();
    eventually("more polls of the null list", || async {
        requests_to(&server, "/volumes/destroying").await.len() >= polls + 3
    })
    .await;
    assert_eq!(local.handles().await, ["mine"]);
    assert!(
        local
            .metric("volume_agent_central_requests_total{endpoint=\"destroying\",outcome=\"ok\"}")
            .await
            .unwrap_or(0.0)
            >= 3.0
    );
}

#[tokio::test]
async fn destroys_listed_chain_child_first_and_stops_reporting_it() {
    let list = Destroying::default();
    let server = atc(&list).await;
    let agent = Agent::start(&server.uri(), &settings());
    let local = Local::new(&agent);
    local.make("a", None).await;
    local.make("b", Some("a")).await;
    local.make("c", Some("b")).await;
    local.make("other", None).await;
    list.set(Some(&["a", "b", "c", "gone-already"]));
    eventually("only `other` is left and reported", || async {
        local.handles().await == ["other"]
            && reported(&server)
                .await
                .last()
                .is_some_and(|r| r == &["other"])
    })
    .await;
    let log = agent.log();
    let pos = |h: &str| {
        log.find(&format!("destroyed volume handle={h} "))
            .or_else(|| log.find(&format!("\"handle\":\"{h}\"")))
            .unwrap_or_else(|| panic!("no destroy line for {h}:\n{log}"))
    };
    assert!(
        pos("c") < pos("b") && pos("b") < pos("a"),
        "not child first:\n{log}"
    );
}

#[tokio::test]
async fn listed_parent_of_unlisted_child_is_kept_and_reported() {
    let list = Destroying::default();
    let server = atc(&list).await;
    let agent = Agent::start(&server.uri(), &settings());
    let local = Local::new(&agent);
    local.make("p", None).await;
    local.make("kid", Some("p")).await;
    list.set(Some(&["p"]));
    let polls = requests_to(&server, "/volumes/destroying").await.len();
    eventually("several polls naming p", || async {
        requests_to(&server, "/volumes/destroying").await.len() >= polls + 3
    })
    .await;
    assert_eq!(local.handles().await, ["kid", "p"]);
    eventually("p still reported while blocked", || async {
        reported(&server)
            .await
            .last()
            .is_some_and(|r| r == &["kid", "p"])
    })
    .await;
    // Once the child is listed too, both go, child first.
    list.set(Some(&["p", "kid"]));
    eventually("both gone", || async { local.handles().await.is_empty() }).await;
}
