//! The key store suite, run against SQLite and a real PostgreSQL (a throwaway database that
//! scripts/test.sh creates and drops, named by IMAGEGATE_TEST_PG), plus the CLI and the HTTP
//! path with a store-issued key.

mod support;

use std::sync::Arc;
use std::time::Duration;

use imagegate::auth::{AuthError, DbKeyStore, KeyStore};
use imagegate::config::LimitsConfig;
use imagegate::store::keys::{KeyInput, TenantInput};
use imagegate::store::{Database, StoreError};
use serde_json::json;
use support::*;

fn tenant(id: &str) -> TenantInput {
    TenantInput {
        id: id.to_string(),
        models: vec!["dall-e-2".into(), "dall-e-3".into()],
        limits: LimitsConfig {
            requests_per_minute: Some(100),
            images_per_minute: None,
            burst: None,
            ..LimitsConfig::default()
        },
        ..TenantInput::default()
    }
}

async fn eventually_refused(store: &DbKeyStore, token: &str) -> bool {
    for _ in 0..20 {
        store.refresh().await.unwrap();
        if store.authenticate(token).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The same behaviour, whichever database holds the keys.
async fn suite(db: Database) {
    let t = unique("team");
    let created = db.create_tenant(&tenant(&t)).await.unwrap();
    assert_eq!(created.models, ["dall-e-2", "dall-e-3"]);
    assert!(matches!(
        db.create_tenant(&tenant(&t)).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        db.create_tenant(&tenant("bad id!")).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        db.create_key(&KeyInput {
            tenant: unique("nobody"),
            ..KeyInput::default()
        })
        .await,
        Err(StoreError::NotFound(_))
    ));

    let store = DbKeyStore::new(db.clone(), Duration::from_secs(30))
        .await
        .unwrap();
    let key = db
        .create_key(&KeyInput {
            tenant: t.clone(),
            name: "ci".into(),
            models: Some(vec!["dall-e-2".into()]),
            ..KeyInput::default()
        })
        .await
        .unwrap();
    assert!(key.secret.starts_with(&format!("sk-ig-{}-", key.key.id)));
    store.refresh().await.unwrap();
    let p = store.authenticate(&key.secret).await.unwrap();
    assert_eq!(&*p.key_id, key.key.id);
    assert_eq!(&*p.tenant, t);
    assert!(
        p.may_use("dall-e-2") && !p.may_use("dall-e-3"),
        "the key narrows the tenant's models"
    );
    assert_eq!(p.limits.requests_per_minute, Some(100));

    // Only the hash is stored, never the secret; listing never shows it.
    let listed = db.list_keys(Some(&t), None, None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    let shown = serde_json::to_string(&listed[0]).unwrap();
    let secret_part = key.secret.rsplit('-').next().unwrap();
    assert!(!shown.contains(secret_part) && !shown.contains("sha256"));

    // Wrong secret, unknown ids: refused; unknown ids never reach the database.
    let wrong = format!("sk-ig-{}-{}", key.key.id, "x".repeat(40));
    assert!(matches!(
        store.authenticate(&wrong).await,
        Err(AuthError::Unknown)
    ));
    let before = store.lookups();
    for _ in 0..1000 {
        let random = format!(
            "sk-ig-{}-{}",
            hex::encode(rand::random::<[u8; 6]>()),
            "y".repeat(40)
        );
        assert!(store.authenticate(&random).await.is_err());
    }
    assert_eq!(store.lookups(), before, "random keys reached the database");

    // Rotation with grace: both secrets work until the grace ends.
    let rotated = db
        .rotate_key(&key.key.id, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_ne!(rotated.secret, key.secret);
    store.refresh().await.unwrap();
    assert!(store.authenticate(&rotated.secret).await.is_ok());
    assert!(
        store.authenticate(&key.secret).await.is_ok(),
        "the old secret works during its grace"
    );
    let again = db.rotate_key(&key.key.id, Duration::ZERO).await.unwrap();
    store.refresh().await.unwrap();
    assert!(store.authenticate(&again.secret).await.is_ok());
    assert!(
        store.authenticate(&rotated.secret).await.is_err(),
        "no grace: the previous secret stops"
    );

    // Disable, tenant disable, expiry, revoke.
    db.set_key_disabled(&key.key.id, true).await.unwrap();
    assert!(eventually_refused(&store, &again.secret).await);
    db.set_key_disabled(&key.key.id, false).await.unwrap();
    store.refresh().await.unwrap();
    assert!(store.authenticate(&again.secret).await.is_ok());
    db.set_tenant_disabled(&t, true).await.unwrap();
    assert!(matches!(
        {
            store.refresh().await.unwrap();
            store.authenticate(&again.secret).await
        },
        Err(AuthError::Disabled)
    ));
    db.set_tenant_disabled(&t, false).await.unwrap();
    let expired = db
        .create_key(&KeyInput {
            tenant: t.clone(),
            expires_at: Some(imagegate::store::keys::now() - 1),
            ..KeyInput::default()
        })
        .await
        .unwrap();
    store.refresh().await.unwrap();
    assert!(matches!(
        store.authenticate(&expired.secret).await,
        Err(AuthError::Expired)
    ));
    db.revoke_key(&key.key.id).await.unwrap();
    store.refresh().await.unwrap();
    assert!(matches!(
        store.authenticate(&again.secret).await,
        Err(AuthError::Revoked)
    ));
    assert!(matches!(
        db.rotate_key(&key.key.id, Duration::ZERO).await,
        Err(StoreError::Conflict(_))
    ));

    // Pagination by id.
    let many = unique("many");
    db.create_tenant(&tenant(&many)).await.unwrap();
    for _ in 0..5 {
        db.create_key(&KeyInput {
            tenant: many.clone(),
            ..KeyInput::default()
        })
        .await
        .unwrap();
    }
    let first = db.list_keys(Some(&many), None, None, 2).await.unwrap();
    let second = db
        .list_keys(Some(&many), None, Some(&first[1].id), 2)
        .await
        .unwrap();
    let third = db
        .list_keys(Some(&many), None, Some(&second[1].id), 2)
        .await
        .unwrap();
    assert_eq!((first.len(), second.len(), third.len()), (2, 2, 1));
    assert!(first[1].id < second[0].id);
    assert!(matches!(
        db.delete_tenant(&many).await,
        Err(StoreError::Conflict(_))
    ));

    // Last-used times are written in batches.
    let fresh = db
        .create_key(&KeyInput {
            tenant: t.clone(),
            ..KeyInput::default()
        })
        .await
        .unwrap();
    store.refresh().await.unwrap();
    store.authenticate(&fresh.secret).await.unwrap();
    store.flush_last_used().await.unwrap();
    assert!(db
        .get_key(&fresh.key.id)
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_some());
}

#[tokio::test]
async fn sqlite_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Database::sqlite(dir.path()).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_store_suite() {
    let Some(url) = pg_url() else { return };
    suite(Database::connect(&url).await.unwrap()).await;
}

#[tokio::test]
async fn replicas_sharing_postgres_see_new_and_revoked_keys_within_a_second() {
    let Some(url) = pg_url() else { return };
    // Two "replicas" starting together run the migrations concurrently.
    let (a, b) = tokio::join!(Database::connect(&url), Database::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    let one = DbKeyStore::new(a.clone(), Duration::from_secs(300))
        .await
        .unwrap();
    let two = DbKeyStore::new(b.clone(), Duration::from_secs(300))
        .await
        .unwrap();
    let (w1, w2) = (
        tokio::spawn(one.clone().watch()),
        tokio::spawn(two.clone().watch()),
    );
    let t = unique("shared");
    a.create_tenant(&tenant(&t)).await.unwrap();
    let key = a
        .create_key(&KeyInput {
            tenant: t,
            ..KeyInput::default()
        })
        .await
        .unwrap();
    let works = |s: Arc<DbKeyStore>, token: String| async move {
        for _ in 0..20 {
            if s.authenticate(&token).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(
        works(two.clone(), key.secret.clone()).await,
        "a key made through one works on the other"
    );
    a.revoke_key(&key.key.id).await.unwrap();
    let started = std::time::Instant::now();
    while two.authenticate(&key.secret).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "revocation took longer than a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w1.abort();
    w2.abort();
}

#[tokio::test]
async fn a_store_key_works_over_http_and_stops_when_revoked() {
    let gw = Gateway::start(&sandbox_config("", "")).await;
    let db = Database::sqlite(gw.data_dir.path()).await.unwrap();
    db.create_tenant(&tenant("web")).await.unwrap();
    let key = db
        .create_key(&KeyInput {
            tenant: "web".into(),
            ..KeyInput::default()
        })
        .await
        .unwrap();
    let body = json!({"prompt": "x", "size": "256x256", "response_format": "b64_json"});
    let mut ok = false;
    for _ in 0..30 {
        if gw.generate_as(&key.secret, body.clone()).await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a key created in the store works within a second");
    let err = expect_error(
        gw.generate_as(&key.secret, json!({"model": "dall-e-9", "prompt": "x"}))
            .await,
        404,
    )
    .await;
    assert_eq!(err["code"], "model_not_found");
    db.revoke_key(&key.key.id).await.unwrap();
    let mut refused = false;
    for _ in 0..30 {
        let resp = gw.generate_as(&key.secret, body.clone()).await;
        if resp.status() == 401 {
            let err = expect_error(resp, 401).await;
            assert_eq!(err["message"], "This API key has been revoked.");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused);
}
