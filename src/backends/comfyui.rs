//! ComfyUI: a workflow in API format with our fields written into mapped node inputs,
//! `POST /prompt`, poll `/history/{id}` until done (within the deadline), fetch each output
//! through `/view`. `node_errors` and execution errors become a 502 naming the node; a job
//! past its deadline (or abandoned by its client) is interrupted and removed from the queue.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::client::{read_capped, transport_error, MAX_ANSWER_BYTES};
use super::local::{self, CancelOnDrop};
use super::{Backend, BackendError, GeneratedImage, Generation, ImagePayload, UpstreamCall};
use crate::config::{ComfyConfig, ConfigError, LocalGeneration};

/// Reads an API-format workflow: an object of nodes with `class_type` and `inputs`.
pub fn load_workflow(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let graph: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let nodes = graph.as_object().ok_or_else(|| {
        format!(
            "{} is not an API-format workflow (an object of nodes)",
            path.display()
        )
    })?;
    if nodes.is_empty()
        || nodes
            .values()
            .any(|n| n.get("class_type").is_none() || !n["inputs"].is_object())
    {
        return Err(format!(
            "{} is not an API-format workflow: every node needs class_type and inputs (export it with \"Save (API)\")",
            path.display()
        ));
    }
    Ok(graph)
}

/// `"NODE_ID.inputs.NAME"`: where one of our fields goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRef {
    node: String,
    input: String,
}

impl InputRef {
    pub fn parse(text: &str, graph: &Value) -> Result<Self, String> {
        let mut parts = text.splitn(3, '.');
        let (Some(node), Some("inputs"), Some(input)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("\"{text}\" is not of the form NODE_ID.inputs.NAME"));
        };
        let inputs = graph
            .get(node)
            .and_then(|n| n.get("inputs"))
            .ok_or_else(|| format!("the workflow has no node \"{node}\""))?;
        if inputs.get(input).is_none() {
            let class = graph[node]["class_type"].as_str().unwrap_or("?");
            return Err(format!(
                "node \"{node}\" ({class}) has no input \"{input}\""
            ));
        }
        Ok(InputRef {
            node: node.to_string(),
            input: input.to_string(),
        })
    }

    fn set(&self, graph: &mut Value, value: Value) {
        graph[&self.node]["inputs"][&self.input] = value;
    }
}

pub struct ComfyBackend {
    http: reqwest::Client,
    base: String,
    graph: Value,
    inputs: Vec<(String, InputRef)>,
    generation: LocalGeneration,
    poll_interval: Duration,
    timeout: Duration,
    probe_interval: Duration,
}

impl ComfyBackend {
    /// Reads the workflow and finds where each mapped field goes in it; every problem is
    /// an error at its config path (`path` is the backend's, `backends.NAME`).
    pub fn new(
        c: &ComfyConfig,
        http: reqwest::Client,
        path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let graph = load_workflow(&c.workflow)
            .map_err(|e| vec![ConfigError::new(format!("{path}.workflow"), e)])?;
        let mut inputs = Vec::new();
        let mut errors = Vec::new();
        for (field, target) in &c.inputs {
            match InputRef::parse(target, &graph) {
                Ok(r) => inputs.push((field.clone(), r)),
                Err(e) => errors.push(ConfigError::new(format!("{path}.inputs.{field}"), e)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ComfyBackend {
            http,
            base: c.base_url.trim_end_matches('/').to_string(),
            graph,
            inputs,
            generation: c.generation(),
            poll_interval: c.poll_interval,
            timeout: c.timeout,
            probe_interval: c.probe_interval,
        })
    }

    /// The workflow with this request's values written in.
    pub fn graph_for(&self, call: &UpstreamCall<'_>, prompt: &str, seed: u64) -> Value {
        let r = call.request;
        let sampling = local::sampling(&self.generation, r);
        let mut graph = self.graph.clone();
        for (field, target) in &self.inputs {
            let value = match field.as_str() {
                "prompt" => json!(prompt),
                "negative_prompt" => json!(self.generation.negative_prompt),
                "seed" => json!(seed),
                "width" => json!(r.size.width),
                "height" => json!(r.size.height),
                "batch_size" => json!(r.n),
                "steps" => json!(sampling.steps),
                "cfg" => json!(sampling.cfg),
                "checkpoint" => match &self.generation.checkpoint {
                    Some(c) => json!(c),
                    None => continue,
                },
                "filename_prefix" => json!(format!("imagegate_{}", call.request_id)),
                _ => continue,
            };
            target.set(&mut graph, value);
        }
        graph
    }

    async fn json_call(
        &self,
        rb: reqwest::RequestBuilder,
        call: &UpstreamCall<'_>,
    ) -> Result<(u16, Value), BackendError> {
        let timeout = self.timeout.min(call.remaining());
        if timeout.is_zero() {
            return Err(BackendError::Timeout);
        }
        let resp = rb.timeout(timeout).send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let body = read_capped(resp, MAX_ANSWER_BYTES).await?;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

/// `node_errors` of a refused prompt, one line per node.
fn describe_node_errors(v: &Value) -> String {
    let mut out = Vec::new();
    if let Some(nodes) = v["node_errors"].as_object() {
        for (id, node) in nodes {
            let class = node["class_type"].as_str().unwrap_or("?");
            let errors: Vec<String> = node["errors"]
                .as_array()
                .map(|errs| {
                    errs.iter()
                        .map(|e| {
                            let msg = e["message"].as_str().unwrap_or("error");
                            match e["details"].as_str().filter(|d| !d.is_empty()) {
                                Some(d) => format!("{msg}: {d}"),
                                None => msg.to_string(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(format!("node {id} ({class}): {}", errors.join("; ")));
        }
    }
    if out.is_empty() {
        let e = &v["error"];
        out.push(
            e["message"]
                .as_str()
                .or(e.as_str())
                .unwrap_or("the prompt was refused")
                .to_string(),
        );
    }
    out.join(" | ")
}

/// The `execution_error` message of a failed history entry.
fn describe_execution_error(entry: &Value) -> String {
    let messages = entry["status"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for m in messages {
        if m[0] == "execution_error" {
            let d = &m[1];
            return format!(
                "node {} ({}): {}",
                d["node_id"].as_str().unwrap_or("?"),
                d["node_type"].as_str().unwrap_or("?"),
                d["exception_message"]
                    .as_str()
                    .unwrap_or("execution error")
                    .trim()
            );
        }
    }
    "the workflow failed".to_string()
}

#[async_trait]
impl Backend for ComfyBackend {
    fn kind(&self) -> &'static str {
        "comfyui"
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        super::translate::require_plain_png(call.request)?;
        if self.graph.is_null() {
            return Err(BackendError::Workflow(
                "the workflow file could not be loaded".into(),
            ));
        }
        let prompt = local::prompt(&self.generation, call.request);
        let revised = (prompt != call.request.prompt).then(|| prompt.clone());
        let seed = local::seed(&self.generation, &call.request.prompt);
        let client_id = hex::encode(rand::random::<[u8; 16]>());
        let body = json!({"prompt": self.graph_for(&call, &prompt, seed), "client_id": client_id});

        let (status, answer) = self
            .json_call(
                self.http.post(format!("{}/prompt", self.base)).json(&body),
                &call,
            )
            .await?;
        if status == 400 {
            return Err(BackendError::Workflow(describe_node_errors(&answer)));
        }
        if !(200..300).contains(&status) {
            return Err(BackendError::Status {
                status,
                message: answer.to_string(),
            });
        }
        let prompt_id = answer["prompt_id"]
            .as_str()
            .ok_or_else(|| BackendError::BadResponse("no prompt_id in the answer".into()))?
            .to_string();

        // From here the job is on the node: stop it if we give up on it.
        let mut cancel = CancelOnDrop::new();
        cancel.add(
            self.http
                .post(format!("{}/interrupt", self.base))
                .json(&json!({"prompt_id": prompt_id})),
        );
        cancel.add(
            self.http
                .post(format!("{}/queue", self.base))
                .json(&json!({"delete": [prompt_id]})),
        );

        let entry = loop {
            if call.remaining() <= self.poll_interval {
                tokio::time::sleep(call.remaining()).await;
                return Err(BackendError::Timeout);
            }
            tokio::time::sleep(self.poll_interval).await;
            let (status, history) = self
                .json_call(
                    self.http.get(format!("{}/history/{prompt_id}", self.base)),
                    &call,
                )
                .await?;
            if !(200..300).contains(&status) {
                continue;
            }
            let entry = &history[&prompt_id];
            if entry.is_null() {
                continue;
            }
            match entry["status"]["status_str"].as_str() {
                Some("error") => {
                    cancel.disarm();
                    return Err(BackendError::Workflow(describe_execution_error(entry)));
                }
                _ if entry["status"]["completed"] == true => break entry.clone(),
                _ => continue,
            }
        };
        cancel.disarm();

        let mut images = Vec::new();
        if let Some(outputs) = entry["outputs"].as_object() {
            for output in outputs.values() {
                for img in output["images"].as_array().into_iter().flatten() {
                    if img["type"] != "output" {
                        continue;
                    }
                    let query = [
                        ("filename", img["filename"].as_str().unwrap_or_default()),
                        ("subfolder", img["subfolder"].as_str().unwrap_or_default()),
                        ("type", "output"),
                    ];
                    let timeout = self.timeout.min(call.remaining());
                    let resp = self
                        .http
                        .get(format!("{}/view", self.base))
                        .query(&query)
                        .timeout(timeout)
                        .send()
                        .await
                        .map_err(transport_error)?;
                    let status = resp.status().as_u16();
                    let bytes = read_capped(resp, MAX_ANSWER_BYTES).await?;
                    if !(200..300).contains(&status) {
                        return Err(BackendError::Status {
                            status,
                            message: "cannot fetch an output image".into(),
                        });
                    }
                    images.push(GeneratedImage {
                        payload: ImagePayload::Bytes(bytes),
                        revised_prompt: revised.clone(),
                    });
                }
            }
        }
        if images.is_empty() {
            return Err(BackendError::BadResponse(
                "the workflow finished without output images (is there a SaveImage node?)".into(),
            ));
        }
        images.truncate(call.request.n as usize);
        Ok(Generation { images, meta: None })
    }

    fn probe_interval(&self) -> Option<Duration> {
        Some(self.probe_interval)
    }

    async fn probe(&self) -> Result<(), BackendError> {
        let resp = self
            .http
            .get(format!("{}/system_stats", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(BackendError::Status {
                status,
                message: "system_stats failed".into(),
            })
        }
    }
}
