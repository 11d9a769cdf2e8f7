//! The real agent against a wiremock central API speaking the native dialect.

use std::time::Duration;

use e2e::wiremock::{MockServer, ResponseTemplate};
use e2e::*;

async fn central(script: &DesiredScript) -> MockServer {
    e2e::faults::mock_central(script).await
}

/// Makes a chain a <- b <- c plus an unrelated keeper, all desired.
async fn chain(local: &Local, script: &DesiredScript) {
    local.make("a", None).await;
    local.make("b", Some("a")).await;
    local.make("c", Some("b")).await;
    local.make("keeper", None).await;
    script.set(
        &[
            ("a", None),
            ("b", Some("a")),
            ("c", Some("b")),
            ("keeper", None),
        ],
        &[],
    );
}

async fn desired_polls(server: &MockServer) -> usize {
    requests_to(server, "/volumes/desired").await.len()
}

#[tokio::test]
async fn destroys_three_deep_chain_in_one_pass_child_first() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    chain(&local, &script).await;
    script.set(&[("keeper", None)], &["a", "b", "c"]);

    eventually("the chain is reported destroyed", || async {
        destroyed(&server).await.len() >= 3
    })
    .await;
    // One pass: the first report naming any of them names all three, child first.
    let first = reports(&server)
        .await
        .into_iter()
        .find(|r| !r.destroyed.is_empty())
        .expect("a report with destroyed volumes");
    let order: Vec<&str> = first.destroyed.iter().map(|h| h.as_str()).collect();
    assert_eq!(order, ["c", "b", "a"]);
    assert_eq!(local.handles().await, ["keeper"]);
    assert!(!agent.root().join("live/a").exists());
    assert!(agent.root().join("live/keeper").exists());
}

#[tokio::test]
async fn blocks_parent_whose_child_is_desired_and_reports_it() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("p", None).await;
    local.make("kid", Some("p")).await;
    script.set(&[("kid", Some("p"))], &["p"]);

    eventually("p is reported blocked by kid", || async {
        reports(&server).await.iter().any(|r| {
            r.blocked.iter().any(|b| {
                b.handle.as_str() == "p" && b.by_children.iter().any(|c| c.as_str() == "kid")
            })
        })
    })
    .await;
    assert_eq!(local.handles().await, ["kid", "p"]);
    assert!(destroyed(&server).await.is_empty());
    assert_eq!(
        local.metric("volume_agent_blocked_volumes").await,
        Some(1.0)
    );
    // How long p has been blocked grows from the pass that first found it blocked...
    let longest = || async {
        local
            .metric("volume_agent_blocked_longest_seconds")
            .await
            .unwrap_or(0.0)
    };
    let first = longest().await;
    assert!(first > 0.0, "{first}");
    eventually("p blocked longer than at the first look", || async {
        longest().await > first
    })
    .await;
    // ... and goes back to 0 once nothing is blocked.
    script.set(&[], &["kid", "p"]);
    eventually("kid, then p destroyed", || async {
        local.handles().await.is_empty()
    })
    .await;
    eventually("nothing blocked any more", || async {
        local.metric("volume_agent_blocked_volumes").await == Some(0.0) && longest().await == 0.0
    })
    .await;
}

#[tokio::test]
async fn not_modified_answer_causes_no_work() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("v", None).await;
    script.set(&[("v", None)], &[]);
    let polls_before = desired_polls(&server).await;
    eventually("several conditional polls", || async {
        desired_polls(&server).await >= polls_before + 5
    })
    .await;
    let polls = requests_to(&server, "/volumes/desired").await;
    let conditional = polls
        .iter()
        .filter(|r| r.headers.get("if-none-match").is_some())
        .count();
    assert!(
        conditional >= 4,
        "only {conditional} polls carried If-None-Match"
    );
    assert!(
        local
            .metric("volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"not_modified\"}")
            .await
            .unwrap_or(0.0)
            >= 3.0
    );
    assert!(destroyed(&server).await.is_empty());
    assert_eq!(local.handles().await, ["v"]);
    assert_eq!(local.metric("volume_agent_destroys_total").await, Some(0.0));
}

#[tokio::test]
async fn ignores_desired_set_with_older_revision() {
    let script = DesiredScript::new("w1");
    script.with(|s| s.revision = 10);
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("v", None).await;
    script.set(&[("v", None)], &[]);
    eventually("revision 11 applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(11.0)
    })
    .await;
    // The central side goes back in time and asks for v's destruction.
    script.with(|s| {
        s.revision = 5;
        s.keep.clear();
        s.destroying = vec![h("v")];
    });
    local
        .wait_counter(
            "the stale answer is counted",
            "volume_agent_stale_answers_total",
            2.0,
        )
        .await;
    assert_eq!(local.handles().await, ["v"]);
    assert_eq!(
        local.metric("volume_agent_desired_revision").await,
        Some(11.0)
    );
}

#[tokio::test]
async fn ignores_desired_set_of_another_worker() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("v", None).await;
    script.with(|s| {
        s.worker = "w2".into();
        s.destroying = vec![h("v")];
        s.revision += 1;
    });
    local
        .wait_counter(
            "the misrouted answer is counted",
            "volume_agent_stale_answers_total",
            2.0,
        )
        .await;
    assert_eq!(local.handles().await, ["v"]);
}

#[tokio::test]
async fn server_errors_and_timeouts_back_off_and_destroy_nothing() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("v", None).await;
    script.set(&[("v", None)], &[]);
    eventually("the first answer is applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(2.0)
    })
    .await;
    script.with(|s| s.override_response = Some(ResponseTemplate::new(500).set_body_string("boom")));
    local
        .wait_counter(
            "5xx counted",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"status_5xx\"}",
            2.0,
        )
        .await;
    // Backing off: the gaps between polls grow beyond the 200 ms interval.
    let before = desired_polls(&server).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = desired_polls(&server).await - before;
    assert!(
        during <= 6,
        "{during} polls in 2 s while failing: no backoff"
    );

    script.with(|s| {
        s.override_response = Some(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
    });
    local
        .wait_counter(
            "timeouts counted",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"timeout\"}",
            1.0,
        )
        .await;
    assert_eq!(local.handles().await, ["v"]);
    // Recovers when the central side does.
    script.with(|s| s.override_response = None);
    script.set(&[], &["v"]);
    eventually("v is destroyed once the API answers again", || async {
        local.handles().await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn malformed_json_and_oversized_body_are_errors_not_crashes() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        max_body_bytes: 64 * 1024,
        ..AgentSettings::default()
    };
    let mut agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    local.make("v", None).await;
    script.with(|s| {
        s.override_response =
            Some(ResponseTemplate::new(200).set_body_string("{\"worker\": \"w1\", \"revision\": "))
    });
    local
        .wait_counter(
            "malformed answer counted",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"malformed\"}",
            1.0,
        )
        .await;
    let big = format!("[\"{}\"]", "x".repeat(200 * 1024));
    script.with(|s| s.override_response = Some(ResponseTemplate::new(200).set_body_string(big)));
    local
        .wait_counter(
            "oversized answer counted",
            "volume_agent_central_requests_total{endpoint=\"desired\",outcome=\"too_large\"}",
            1.0,
        )
        .await;
    assert_eq!(local.handles().await, ["v"]);
    assert!(agent.pid().is_some());
    assert_eq!(
        agent.terminate(),
        Some(0),
        "agent exits cleanly on SIGTERM:\n{}",
        agent.log()
    );
}

#[tokio::test]
async fn mass_destroy_guard_refuses_and_reports() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        unknown_grace: "1s",
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    let names: Vec<String> = (0..12).map(|i| format!("v{i:02}")).collect();
    for n in &names {
        local.make(n, None).await;
    }
    let keep: Vec<(&str, Option<&str>)> = names.iter().map(|n| (n.as_str(), None)).collect();
    script.set(&keep, &[]);
    // An empty answer: every volume is unknown. After the grace period the guard trips.
    script.with(|s| {
        s.keep.clear();
        s.revision += 1;
        s.as_of = Some(chrono::Utc::now() + chrono::Duration::seconds(60));
    });
    eventually("the refusal is reported", || async {
        reports(&server).await.iter().any(|r| r.refused.is_some())
    })
    .await;
    assert!(
        local
            .metric("volume_agent_plans_refused_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(local.handles().await.len(), 12);
    assert!(destroyed(&server).await.is_empty());
}

#[tokio::test]
async fn unknown_volumes_wait_for_the_grace_period() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        unknown_grace: "3s",
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    local.make("young", None).await;
    local.make("kept", None).await;
    script.set(&[("kept", None)], &[]);
    eventually("the answer is applied", || async {
        local.metric("volume_agent_desired_revision").await == Some(2.0)
    })
    .await;
    // Several passes inside the grace period leave it alone.
    let polls = desired_polls(&server).await;
    eventually("a few more polls", || async {
        desired_polls(&server).await >= polls + 3
    })
    .await;
    assert!(local.handles().await.contains(&"young".to_string()));
    // Past the grace period by our clock, but the answer held (304s) says it was young as
    // of its snapshot: still kept.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(local.handles().await.contains(&"young".to_string()));
    // A fresh answer that still does not know it: now it goes.
    script.set(&[("kept", None)], &[]);
    eventually("the unknown volume is destroyed and reported", || async {
        local.handles().await == ["kept"] && destroyed(&server).await == ["young"]
    })
    .await;
}

#[tokio::test]
async fn reports_resource_types_at_start_and_after_a_version_change() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let agent = Agent::start(&server.uri(), &AgentSettings::default());
    let write = |version: &str| {
        let d = agent.types_dir().join("git");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(
            d.join("resource_metadata.json"),
            format!(r#"{{"type":"git","version":"{version}","privileged":false,"unique_version_history":false}}"#),
        )
        .expect("write metadata");
    };
    eventually("the empty set is reported at start", || async {
        !type_reports(&server).await.is_empty()
    })
    .await;
    write("1.0.0");
    eventually("git 1.0.0 reported", || async {
        type_reports(&server)
            .await
            .iter()
            .any(|r| r.resource_types.iter().any(|t| t.version == "1.0.0"))
    })
    .await;
    write("1.1.0");
    eventually("git 1.1.0 reported without a restart", || async {
        type_reports(&server)
            .await
            .last()
            .is_some_and(|r| r.resource_types.len() == 1 && r.resource_types[0].version == "1.1.0")
    })
    .await;
    let last = type_reports(&server).await.pop().expect("a report");
    assert!(last.resource_types[0].image.ends_with("git/rootfs.tgz"));
}

#[tokio::test]
async fn named_handle_it_does_not_have_is_reported_destroyed() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let _agent = Agent::start(&server.uri(), &AgentSettings::default());
    script.set(&[], &["ghost"]);
    eventually("ghost reported destroyed", || async {
        destroyed(&server).await.contains(&"ghost".to_string())
    })
    .await;
}

#[tokio::test]
async fn sends_bearer_token_and_user_agent() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let settings = AgentSettings {
        token_file: Some(token),
        ..AgentSettings::default()
    };
    let _agent = Agent::start(&server.uri(), &settings);
    eventually("a poll with the token", || async {
        requests_to(&server, "/volumes/desired")
            .await
            .iter()
            .any(|r| {
                r.headers.get("authorization").and_then(|v| v.to_str().ok())
                    == Some("Bearer s3cret")
            })
    })
    .await;
    let polls = requests_to(&server, "/volumes/desired").await;
    let ua = polls
        .last()
        .and_then(|r| r.headers.get("user-agent"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ua.starts_with("volume-agent/"), "{ua}");
}

#[tokio::test]
async fn reports_missing_volumes_bytes_and_disk_figures() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    // No floor: whatever this machine's disk holds, there is no pressure.
    let settings = AgentSettings {
        extra: "min_free = \"0%\"\n".into(),
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    let v = local.make("here", None).await;
    std::fs::write(
        std::path::Path::new(&v.path).join("blob"),
        vec![5u8; 256 * 1024],
    )
    .expect("write blob");
    script.set(&[("here", None), ("lost", None)], &[]);
    eventually("a report with missing, bytes and disk", || async {
        reports(&server).await.iter().any(|r| {
            r.missing.iter().any(|m| m.as_str() == "lost")
                && r.volumes
                    .iter()
                    .any(|v| v.handle.as_str() == "here" && v.bytes.unwrap_or(0) >= 256 * 1024)
                && r.disk
                    .as_ref()
                    .is_some_and(|d| d.total_bytes > 0 && !d.pressure)
        })
    })
    .await;
}

#[tokio::test]
async fn disk_pressure_is_reported_and_polls_at_once_without_destroying() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        // Every disk is "full" below 100 % free, and polls are rare: only pressure polls.
        poll_interval: "1h",
        extra: "min_free = \"100%\"\n".into(),
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    local.make("keep-me", None).await;
    script.set(&[("keep-me", None)], &[]);
    // With the floor in bytes (100 % of the disk), so the central side knows how much
    // room to make.
    eventually("pressure reported with the floor", || async {
        reports(&server).await.iter().any(|r| {
            r.disk
                .as_ref()
                .is_some_and(|d| d.pressure && d.min_free_bytes == Some(d.total_bytes))
        })
    })
    .await;
    // Polls are an hour apart: the one at start-up, then one as soon as pressure is seen.
    eventually("a poll at once under pressure", || async {
        requests_to(&server, "/volumes/desired").await.len() >= 2
    })
    .await;
    assert_eq!(local.metric("volume_agent_disk_pressure").await, Some(1.0));
    assert_eq!(local.handles().await, ["keep-me"]);
}

#[tokio::test]
async fn destroy_rate_throttles_removal_and_the_metric_shows_it() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        extra: "destroy_rate = 100\n".into(),
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    let v = local.make("many", None).await;
    for i in 0..400 {
        std::fs::write(std::path::Path::new(&v.path).join(format!("f{i}")), b"x").expect("write");
    }
    script.set(&[], &["many"]);
    eventually("the volume is destroyed", || async {
        local.handles().await.is_empty()
    })
    .await;
    eventually("throttling is exported", || async {
        local
            .metric("volume_agent_destroy_throttled_seconds_total")
            .await
            .unwrap_or(0.0)
            > 0.5
    })
    .await;
}

#[tokio::test]
async fn gc_plan_lists_directories_found_without_a_record() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let mut agent = Agent::start(&server.uri(), &AgentSettings::default());
    let local = Local::new(&agent);
    local.make("known", None).await;
    assert_eq!(agent.terminate(), Some(0));
    // A directory made by hand while the agent was down.
    std::fs::create_dir_all(agent.root().join("live/handmade/volume")).expect("mkdir");
    agent.spawn();
    // A new client: the old one's pooled connection died with the old process.
    let local = Local::new(&agent);
    let plan: protocol::local::PlanView = local
        .http
        .get(format!("{}/gc/plan", local.base))
        .send()
        .await
        .expect("plan")
        .json()
        .await
        .expect("plan json");
    assert!(
        plan.quarantined.iter().any(|q| q.contains("handmade")),
        "{plan:?}"
    );
    assert!(plan.actions.iter().any(|a| a.handle.as_str() == "known"));
    assert!(
        agent
            .root()
            .join("quarantine")
            .read_dir()
            .expect("quarantine")
            .count()
            == 1
    );
}

/// Runs the agent's CLI against the daemon's local API; returns its standard output.
async fn cli(agent: &Agent, args: &[&str]) -> String {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--api".to_string(), agent.api.clone()]);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(agent_binary())
            .args(&args)
            .output()
            .expect("run the CLI")
    })
    .await
    .expect("CLI task");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The table line of `handle` in a CLI table.
fn line_of<'a>(table: &'a str, handle: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(handle))
        .unwrap_or_else(|| panic!("no line for {handle} in\n{table}"))
}

#[tokio::test]
async fn reports_volume_whose_directory_vanished_as_missing() {
    let script = DesiredScript::new("w1");
    let server = central(&script).await;
    let settings = AgentSettings {
        scan_interval: Some("200ms"),
        unknown_grace: "1s",
        ..AgentSettings::default()
    };
    let agent = Agent::start(&server.uri(), &settings);
    let local = Local::new(&agent);
    local.make("gone", None).await;
    local.make("keeper", None).await;
    script.set(&[("gone", None), ("keeper", None)], &[]);
    eventually("both volumes are reported", || async {
        reports(&server).await.iter().any(|r| r.volumes.len() == 2)
    })
    .await;

    // Removed behind the agent's back, while it runs.
    std::fs::remove_dir_all(agent.root().join("live/gone")).expect("remove the volume dir");
    eventually(
        "the report carries it in missing, not in volumes",
        || async {
            reports(&server).await.last().is_some_and(|r| {
                r.missing.iter().any(|m| m.as_str() == "gone")
                    && r.volumes.iter().all(|v| v.handle.as_str() != "gone")
                    && r.volumes.iter().any(|v| v.handle.as_str() == "keeper")
            })
        },
    )
    .await;
    let listed = local.list().await;
    let flags: Vec<(&str, bool)> = listed
        .iter()
        .map(|v| (v.handle.as_str(), v.missing))
        .collect();
    assert_eq!(flags, [("gone", true), ("keeper", false)]);
    // Baggageclaim's lookups answer as baggageclaim would for a vanished directory.
    let shown: Vec<String> = local
        .http
        .get(format!("{}/volumes", local.base))
        .send()
        .await
        .expect("list")
        .json::<Vec<protocol::local::VolumeJson>>()
        .await
        .expect("list json")
        .into_iter()
        .map(|v| v.handle.to_string())
        .collect();
    assert_eq!(shown, ["keeper"]);
    assert!(line_of(&cli(&agent, &["volumes", "list"]).await, "gone").contains("(missing)"));
    assert!(!line_of(&cli(&agent, &["volumes", "list"]).await, "keeper").contains("missing"));
    let plan = cli(&agent, &["gc", "plan"]).await;
    let words: Vec<&str> = line_of(&plan, "gone").split_whitespace().collect();
    assert_eq!(words.get(1), Some(&"missing"), "{plan}");
    assert_eq!(
        local.metric("volume_agent_missing_volumes").await,
        Some(1.0)
    );
    assert!(destroyed(&server).await.is_empty());

    // The desired set no longer names it: past the grace period its record goes. (The
    // answer's own clock is set ahead, so the grace is counted by the worker's clock
    // alone while the answer is held across 304s.)
    script.with(|s| s.as_of = Some(chrono::Utc::now() + chrono::Duration::minutes(10)));
    script.set(&[("keeper", None)], &[]);
    eventually("the record is gone and reported destroyed", || async {
        local.handles().await == ["keeper"] && destroyed(&server).await.iter().any(|d| d == "gone")
    })
    .await;
    eventually("the gauge follows", || async {
        local.metric("volume_agent_missing_volumes").await == Some(0.0)
    })
    .await;
    assert!(reports(&server)
        .await
        .last()
        .is_some_and(|r| r.missing.is_empty()));
    assert!(agent.root().join("live/keeper/volume/keeper.txt").exists());
}
