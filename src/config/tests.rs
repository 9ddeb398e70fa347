use super::*;

fn env(name: &str) -> Option<String> {
    (name == "OPENAI_KEY").then(|| "sk-upstream".to_string())
}

fn load(yaml: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml(yaml, &env)
}

const GOOD: &str = r#"
listen: 127.0.0.1:9000
backends:
  sandbox: {kind: sandbox}
  openai: {kind: openai, base_url: "https://api.openai.com/v1", api_key: "${OPENAI_KEY}"}
models:
  dall-e-3:
    rules: dall-e-3
    route: {targets: [{backend: openai}, {backend: sandbox, priority: 1}]}
  sdxl:
    rules: {sizes: [512x512, 1024x1024], max_n: 4, quality: [standard, hd]}
    route: {targets: [{backend: sandbox}]}
    timeout: 30s
tenants:
  demo: {models: ["*"], limits: {requests_per_minute: 60}}
keys:
  - {id: demo, tenant: demo, secret: sk-imagegate-demo}
"#;

#[test]
fn a_good_config_loads_with_defaults() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.listen.port(), 9000);
    assert_eq!(c.public_base(), "http://127.0.0.1:9000");
    assert_eq!(c.server.max_body_bytes, 1024 * 1024);
    assert_eq!(c.images.url_ttl.as_secs(), 3600);
    match &c.backends["openai"] {
        BackendConfig::Openai(o) => assert_eq!(o.api_key.as_ref().unwrap().expose(), "sk-upstream"),
        other => panic!("wrong kind {other:?}"),
    }
    let sdxl = c.models["sdxl"].rules.resolve(&c.catalog).unwrap();
    assert_eq!(sdxl.max_n, 4);
    assert_eq!(sdxl.default_size.to_string(), "1024x1024");
    assert!(sdxl.styles.is_empty());
    assert_eq!(c.models["sdxl"].timeout.as_secs(), 30);
    assert_eq!(c.models["dall-e-3"].timeout.as_secs(), 120);
}

#[test]
fn unknown_backend_is_named_by_path() {
    let yaml = GOOD.replace("{backend: openai}", "{backend: x}");
    let err = load(&yaml).unwrap_err().to_string();
    assert_eq!(
        err,
        r#"models.dall-e-3.route.targets[0].backend: unknown backend "x""#
    );
}

#[test]
fn typos_are_named_by_path() {
    let yaml = GOOD.replace("max_n: 4", "max_nn: 4");
    let err = load(&yaml).unwrap_err().to_string();
    assert!(err.starts_with("models.sdxl.rules"), "{err}");
    let yaml = GOOD.replace("listen: 127.0.0.1:9000", "listen: nowhere");
    let err = load(&yaml).unwrap_err().to_string();
    assert!(err.starts_with("listen:"), "{err}");
    let yaml = GOOD.replace("kind: sandbox}", "kind: sandbox, colour: red}");
    let err = load(&yaml).unwrap_err().to_string();
    assert!(err.starts_with("backends.sandbox"), "{err}");
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn unset_variables_are_errors_unless_defaulted() {
    let yaml = GOOD.replace("${OPENAI_KEY}", "${NOT_SET}");
    let err = load(&yaml).unwrap_err().to_string();
    assert!(
        err.starts_with("backends.openai.api_key: environment variable NOT_SET"),
        "{err}"
    );
    let yaml = GOOD.replace("${OPENAI_KEY}", "${NOT_SET:-sk-default}");
    assert!(load(&yaml).is_ok());
}

#[test]
fn cross_references_are_checked() {
    let yaml = GOOD
        .replace("tenant: demo,", "tenant: nobody,")
        .replace(r#"models: ["*"]"#, "models: [dall-e-9]");
    let err = load(&yaml).unwrap_err();
    let paths: Vec<_> = err.0.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"tenants.demo.models[0]"), "{paths:?}");
    assert!(paths.contains(&"keys[0].tenant"), "{paths:?}");
}

#[test]
fn bad_rules_and_keys_are_rejected() {
    let yaml = GOOD.replace("rules: dall-e-3", "rules: dall-e-9");
    assert!(load(&yaml)
        .unwrap_err()
        .to_string()
        .contains("\"dall-e-9\" is not in the model catalog"));
    let yaml = GOOD.replace("[512x512, 1024x1024]", "[512x512, big]");
    assert!(load(&yaml).is_err());
    let yaml = GOOD.replace("secret: sk-imagegate-demo", "secret_sha256: abc");
    assert!(load(&yaml).unwrap_err().to_string().starts_with("keys[0]"));
    let yaml = GOOD.replace("secret: sk-imagegate-demo", "");
    assert!(load(&yaml).is_err());
}

#[test]
fn shipped_gateway_yaml_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.yaml");
    let c = Config::load(&path).unwrap();
    assert!(c.models.contains_key("dall-e-2"));
    assert!(c.models.contains_key("dall-e-3"));
}
