//! Helpers shared by the integration tests: a fresh database on the shared cluster.
#![allow(dead_code)]

use volume_central::testing::PgCluster;
use volume_central::{Config, Db};

/// A fresh, migrated database and a pool on it.
pub async fn fresh_db() -> (Config, Db) {
    let url = PgCluster::shared()
        .create_database()
        .expect("create database");
    let mut config = Config::with_database_url(url.clone());
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.http_workers = 2;
    config.pool_size = 8;
    volume_central::migrate(&config).await.expect("migrate");
    let db = Db::connect(&url, 32).expect("pool");
    (config, db)
}

/// Runs `sql` and returns the first column of the first row as i64.
pub async fn count(db: &Db, sql: &str) -> i64 {
    let client = db.client().await.expect("client");
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

/// The state of volume `handle`, or None when the row is gone.
pub async fn state_of(db: &Db, handle: &str) -> Option<String> {
    let client = db.client().await.expect("client");
    client
        .query_opt("SELECT state FROM volumes WHERE handle = $1", &[&handle])
        .await
        .expect("query")
        .map(|r| r.get(0))
}

/// Sets a volume's state directly (test setup).
pub async fn force_state(db: &Db, handle: &str, state: &str) {
    let client = db.client().await.expect("client");
    client
        .execute(
            "UPDATE volumes SET state = $2 WHERE handle = $1",
            &[&handle, &state],
        )
        .await
        .expect("force state");
}
