mod common;

use volume_central::migrate::{current_version, latest_version, migrate, MIGRATIONS};
use volume_central::testing::PgCluster;
use volume_central::{Config, Db};

#[tokio::test]
async fn migrations_apply_once_and_again_is_a_no_op() {
    let url = PgCluster::shared().create_database().expect("database");
    let config = Config::with_database_url(url.clone());
    let db = Db::connect(&url, 4).expect("pool");
    assert_eq!(current_version(&db).await.expect("version"), 0);
    let first = volume_central::migrate(&config)
        .await
        .expect("first migrate");
    assert_eq!(first, MIGRATIONS.iter().map(|m| m.0).collect::<Vec<_>>());
    let second = migrate(&db).await.expect("second migrate");
    assert!(second.is_empty(), "second run applied {second:?}");
    assert_eq!(
        current_version(&db).await.expect("version"),
        latest_version()
    );
}

#[tokio::test]
async fn concurrent_migrations_from_two_replicas_both_succeed() {
    let url = PgCluster::shared().create_database().expect("database");
    let a = Db::connect(&url, 2).expect("pool");
    let b = Db::connect(&url, 2).expect("pool");
    let (ra, rb) = tokio::join!(migrate(&a), migrate(&b));
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert_eq!(ra.len() + rb.len(), MIGRATIONS.len(), "{ra:?} {rb:?}");
}

#[tokio::test]
async fn schema_has_the_seed_parent_constraint() {
    let (_config, db) = common::fresh_db().await;
    let client = db.client().await.expect("client");
    let row = client
        .query_one(
            "SELECT pg_get_constraintdef(oid), condeferrable, condeferred
               FROM pg_constraint WHERE conname = 'volumes_parent_fkey'",
            &[],
        )
        .await
        .expect("constraint");
    let def: String = row.get(0);
    assert!(
        def.contains("FOREIGN KEY (parent_id, parent_state) REFERENCES volumes(id, state)")
            && def.contains("ON DELETE RESTRICT")
            && def.contains("DEFERRABLE"),
        "{def}"
    );
    assert!(row.get::<_, bool>(1), "deferrable");
    assert!(!row.get::<_, bool>(2), "initially immediate");
    let unique: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_constraint c
              WHERE c.conrelid = 'volumes'::regclass AND c.contype = 'u'
                AND pg_get_constraintdef(c.oid) = 'UNIQUE (id, state)'",
            &[],
        )
        .await
        .expect("unique")
        .get(0);
    assert_eq!(unique, 1);
}
