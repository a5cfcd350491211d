use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use time::macros::datetime;

use super::*;
use crate::access::DryRun;
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::request::CardRef;
use crate::domain::standing::{Association, RawEntry};
use crate::slack::{SlackApi, SlackError, SlackUser};
use crate::store::{SledStore, Store};

struct ManualClock(Mutex<OffsetDateTime>);

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap()
    }
}

#[derive(Default)]
struct Posts(Mutex<Vec<(String, String)>>);

#[async_trait::async_trait]
impl SlackApi for Posts {
    async fn user(&self, _: &str) -> Result<SlackUser, SlackError> {
        Err(SlackError::Invalid("not used".into()))
    }
    async fn group_members(&self, _: &str) -> Result<Vec<String>, SlackError> {
        Ok(Vec::new())
    }
    async fn post(&self, channel: &str, msg: &Message) -> Result<String, SlackError> {
        self.0
            .lock()
            .unwrap()
            .push((channel.to_string(), msg.text.clone()));
        Ok("1.0".into())
    }
    async fn update(&self, _: &str, _: &str, _: &Message) -> Result<(), SlackError> {
        Ok(())
    }
    async fn dm(&self, user: &str, _: &Message) -> Result<CardRef, SlackError> {
        Ok(CardRef {
            channel: format!("D{user}"),
            ts: "1.0".into(),
        })
    }
    async fn open_view(&self, _: &str, _: &serde_json::Value) -> Result<(), SlackError> {
        Ok(())
    }
    async fn respond(&self, _: &str, _: &Message) -> Result<(), SlackError> {
        Ok(())
    }
    async fn auth_test(&self) -> Result<crate::slack::BotIdentity, SlackError> {
        Ok(crate::slack::BotIdentity {
            user_id: "U0BOT".into(),
            team_id: "T0TEST".into(),
        })
    }
    async fn is_member(&self, _: &str) -> Result<bool, SlackError> {
        Ok(true)
    }
}

/// One standing cluster-admin and one entry of an unknown grant.
#[derive(Default)]
struct FakeReader {
    reads: AtomicUsize,
}

#[async_trait::async_trait]
impl StandingReader for FakeReader {
    async fn read(
        &self,
        _: &ClusterPolicy,
    ) -> Result<ClusterReading, crate::access::standing::Unreadable> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let entry = |principal: &str, policy: &str, mark: Option<&str>| RawEntry {
            principal: principal.into(),
            kind: "STANDARD".into(),
            username: None,
            groups: Vec::new(),
            policies: vec![Association {
                policy: format!("arn:aws:eks::aws:cluster-access-policy/{policy}"),
                scope: "cluster".into(),
                namespaces: Vec::new(),
            }],
            grant_mark: mark.map(str::to_string),
        };
        Ok(ClusterReading {
            entries: vec![
                entry(
                    "arn:aws:iam::1:role/admin",
                    "AmazonEKSClusterAdminPolicy",
                    None,
                ),
                entry(
                    "arn:aws:iam::1:role/x",
                    "AmazonEKSViewPolicy",
                    Some("R-ZZZZZ"),
                ),
            ],
            ..Default::default()
        })
    }
}

const CONFIG: &str = r#"
[slack]
security_channel = "C0SECURITY"
standing_access_digest = "weekly"

[[clusters]]
name = "prod"
region = "us-east-1"
account_id = "111122223333"
approval_channel = "C0APPROVALS"
[clusters.roles.view]
access_policy = "AmazonEKSViewPolicy"
"#;

struct Rig {
    service: Arc<Service>,
    reader: Arc<FakeReader>,
    posts: Arc<Posts>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

fn rig(config: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(config, "test.toml").unwrap();
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let posts = Arc::new(Posts::default());
    let clock = Arc::new(ManualClock(Mutex::new(datetime!(2026-11-23 08:50 UTC))));
    let service = Service::new(
        Arc::new(config),
        store,
        Arc::new(DryRun),
        posts.clone(),
        clock.clone(),
        Arc::new(crate::metrics::Metrics::new()),
        crate::tunables::Tunables::default(),
    );
    let reader = Arc::new(FakeReader::default());
    service.set_standing_reader(reader.clone());
    Rig {
        service,
        reader,
        posts,
        clock,
        _dir: dir,
    }
}

impl Rig {
    async fn tick_at(&self, t: OffsetDateTime) {
        *self.clock.0.lock().unwrap() = t;
        self.service.standing_tick().await;
    }

    fn reads(&self) -> usize {
        self.reader.reads.load(Ordering::SeqCst)
    }

    /// Posts so far, once every spawned send has had the chance to finish.
    async fn posts_settled(&self, expected: usize) -> Vec<(String, String)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let posts = self.posts.0.lock().unwrap().clone();
            if posts.len() >= expected || std::time::Instant::now() > deadline {
                return posts;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn gauge_at_start_then_hourly_and_digest_once_per_week_boundary() {
    let r = rig(CONFIG);
    r.tick_at(datetime!(2026-11-23 08:50 UTC)).await;
    assert_eq!(r.reads(), 1, "refreshed at start");
    let metrics = r.service.metrics().render();
    // The entry tagged for a grant the store does not know counts too.
    assert!(
        metrics.contains(r#"tollgate_standing_access{cluster="prod",level="cluster-admin"} 1"#)
            && metrics.contains(r#"tollgate_standing_access{cluster="prod",level="view"} 1"#)
            && metrics.contains(r#"tollgate_standing_access{cluster="prod",level="edit"} 0"#),
        "{metrics}"
    );

    r.tick_at(datetime!(2026-11-23 08:55 UTC)).await;
    assert_eq!(r.reads(), 1, "not again within the hour");
    assert!(
        r.posts_settled(0).await.is_empty(),
        "no digest before 09:00"
    );

    // Passing Monday 09:00 refreshes and posts, once.
    r.tick_at(datetime!(2026-11-23 09:01 UTC)).await;
    assert_eq!(r.reads(), 2, "the digest's read is the refresh");
    let posts = r.posts_settled(1).await;
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].0, "C0SECURITY");
    assert!(
        posts[0]
            .1
            .contains("prod: 2 standing (cluster-admin 1, admin 0, edit 0, view 1, custom 0)"),
        "{}",
        posts[0].1
    );
    for t in [
        datetime!(2026-11-23 09:06 UTC),
        datetime!(2026-11-23 10:02 UTC),
        datetime!(2026-11-27 09:00 UTC),
        datetime!(2026-11-30 08:59 UTC),
    ] {
        r.tick_at(t).await;
    }
    assert_eq!(r.reads(), 5, "refreshed only where an hour had passed");
    assert_eq!(r.posts_settled(2).await.len(), 1, "one digest per boundary");

    r.tick_at(datetime!(2026-11-30 09:03 UTC)).await;
    assert_eq!(r.posts_settled(2).await.len(), 2, "next Monday posts again");
}

#[tokio::test]
async fn a_process_started_after_the_boundary_does_not_post_that_week() {
    let r = rig(CONFIG);
    r.tick_at(datetime!(2026-11-23 09:30 UTC)).await;
    r.tick_at(datetime!(2026-11-23 10:30 UTC)).await;
    assert_eq!(r.reads(), 2);
    assert!(r.posts_settled(0).await.is_empty());
}

#[tokio::test]
async fn no_digest_when_off() {
    let r = rig(&CONFIG.replace("standing_access_digest = \"weekly\"", ""));
    r.tick_at(datetime!(2026-11-23 08:50 UTC)).await;
    r.tick_at(datetime!(2026-11-23 09:01 UTC)).await;
    assert!(r.posts_settled(0).await.is_empty());
    // The gauge is kept whatever the digest setting.
    assert!(r
        .service
        .metrics()
        .render()
        .contains(r#"tollgate_standing_access{cluster="prod",level="cluster-admin"} 1"#));
}
