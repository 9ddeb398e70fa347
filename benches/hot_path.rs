//! Micro-benchmarks of the pieces every request goes through: parse + validate, key lookup,
//! limiter check, budget reserve + settle, the journal line of the usage ledger, and the
//! response rewrite (small URL answers and a 1.5 MB base64 answer).
//!
//!   cargo bench --bench hot_path

use bytes::Bytes;
use divan::{black_box, Bencher};
use futures_util::FutureExt;
use imagegate::api::{parse_request, ImageData, ImagesResponse};
use imagegate::auth::{KeyStore, StaticKeyStore};
use imagegate::config::Config;
use imagegate::metering::budget::{Hold, MemoryBudgets};
use imagegate::metering::ledger::{Settlement, UsageRow};
use imagegate::policy::{Policy, RateHeaders};

fn main() {
    divan::main();
}

const BODY: &[u8] = br#"{"model":"dall-e-3","prompt":"a lighthouse on a cliff at dusk, oil painting","n":1,"size":"1024x1024","quality":"hd","style":"vivid","response_format":"url","user":"user-1234"}"#;
const KEY: &str = "sk-bench-key-0001";

fn config() -> Config {
    let yaml = format!(
        r#"
backends: {{sandbox: {{kind: sandbox}}}}
models: {{dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}}}
tenants:
  t: {{models: ["*"], limits: {{requests_per_minute: 1000000000, images_per_minute: 1000000000,
       concurrent_requests: 1000000, budget: {{micro_usd: 900000000000000, period: monthly}}}}}}
keys:
{keys}
"#,
        keys = (0..1000)
            .map(|i| format!("  - {{id: k{i}, tenant: t, secret: sk-bench-key-{i:04}}}\n"))
            .collect::<String>()
    );
    Config::from_yaml(&yaml, &|_| None).unwrap()
}

#[divan::bench]
fn parse_and_validate(b: Bencher) {
    let rules = imagegate::config::Catalog::builtin()
        .rules("dall-e-3")
        .unwrap();
    b.bench(|| {
        parse_request(black_box(BODY))
            .unwrap()
            .validate(&rules)
            .unwrap()
    });
}

#[divan::bench]
fn key_lookup_among_1000(b: Bencher) {
    let store = StaticKeyStore::build(&config()).unwrap();
    b.bench(|| {
        store
            .authenticate(black_box(KEY))
            .now_or_never()
            .unwrap()
            .unwrap()
    });
}

#[divan::bench]
fn limiter_check_tenant(b: Bencher) {
    let store = StaticKeyStore::build(&config()).unwrap();
    let principal = store.authenticate(KEY).now_or_never().unwrap().unwrap();
    let policy = Policy::new();
    b.bench(|| {
        let mut headers = RateHeaders::default();
        policy
            .admit(black_box(&principal), 1, &mut headers)
            .unwrap();
        headers
    });
}

#[divan::bench]
fn budget_reserve_and_settle(b: Bencher) {
    let budgets = MemoryBudgets::default();
    let hold = Hold {
        scope: "tenant:t".into(),
        period: "2026-11".into(),
        amount: 80_000,
    };
    b.bench(|| {
        budgets
            .reserve(&hold.scope, &hold.period, hold.amount, u64::MAX / 2)
            .unwrap();
        budgets.settle(black_box(&hold), 80_000);
    });
}

#[divan::bench]
fn ledger_journal_line(b: Bencher) {
    let s = Settlement {
        row: UsageRow {
            id: "019a213c3aa56a6b5fa01234".into(),
            request_id: "req_0123456789abcdef".into(),
            ts_ms: 1_795_627_919_000,
            tenant: "t".into(),
            key_id: "k1".into(),
            model: "dall-e-3".into(),
            backend: Some("openai".into()),
            size: "1024x1024".into(),
            quality: Some("hd".into()),
            n_requested: 1,
            n_delivered: 1,
            reserved_micro_usd: 80_000,
            cost_micro_usd: 80_000,
            status: 200,
            latency_ms: 9000,
            ..UsageRow::default()
        },
        holds: vec![Hold {
            scope: "tenant:t".into(),
            period: "2026-11".into(),
            amount: 80_000,
        }],
        idem: None,
    };
    b.bench(|| serde_json::to_vec(black_box(&s)).unwrap());
}

fn answer(data: Vec<ImageData>) -> ImagesResponse {
    ImagesResponse {
        created: 1_795_627_919,
        data,
        gpt: None,
    }
}

#[divan::bench]
fn response_rewrite_url(b: Bencher) {
    let r = answer(vec![ImageData {
        url: Some("http://127.0.0.1:8080/images/0123456789abcdef0123456789abcdef.png?expires=1795631519&signature=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG".into()),
        b64_json: None,
        revised_prompt: Some("a lighthouse on a cliff at dusk, oil painting".into()),
    }]);
    b.bench(|| black_box(&r).to_chunks());
}

#[divan::bench]
fn response_rewrite_b64_1_5mb(b: Bencher) {
    let b64 = Bytes::from(vec![b'A'; 2_000_000]);
    let r = answer(vec![ImageData {
        url: None,
        b64_json: Some(b64),
        revised_prompt: None,
    }]);
    b.bench(|| black_box(&r).to_chunks());
}
