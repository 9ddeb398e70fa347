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
use crate::api::{EditInputs, Operation};
use crate::config::{ComfyConfig, ConfigError, LocalGeneration};
use sha2::{Digest, Sha256};

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

/// A workflow and where each of our fields goes in it.
struct Workflow {
    graph: Value,
    inputs: Vec<(String, InputRef)>,
}

impl Workflow {
    /// Reads `file` and finds each mapped field; errors at `file_path` and
    /// `inputs_path.FIELD`.
    fn load(
        file: &Path,
        map: &std::collections::BTreeMap<String, String>,
        file_path: &str,
        inputs_path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let graph = load_workflow(file).map_err(|e| vec![ConfigError::new(file_path, e)])?;
        let mut inputs = Vec::new();
        let mut errors = Vec::new();
        for (field, target) in map {
            match InputRef::parse(target, &graph) {
                Ok(r) => inputs.push((field.clone(), r)),
                Err(e) => errors.push(ConfigError::new(format!("{inputs_path}.{field}"), e)),
            }
        }
        if errors.is_empty() {
            Ok(Workflow { graph, inputs })
        } else {
            Err(errors)
        }
    }

    fn maps(&self, field: &str) -> bool {
        self.inputs.iter().any(|(f, _)| f == field)
    }
}

/// An edit's uploaded files on the node, and its denoise.
struct Uploaded {
    image: String,
    mask: Option<String>,
    denoise: f32,
}

pub struct ComfyBackend {
    http: reqwest::Client,
    base: String,
    workflow: Workflow,
    edit: Option<Workflow>,
    edit_denoise: f32,
    variation_denoise: f32,
    generation: LocalGeneration,
    poll_interval: Duration,
    timeout: Duration,
    probe_interval: Duration,
}

impl ComfyBackend {
    /// Reads the workflows and finds where each mapped field goes in them; every problem is
    /// an error at its config path (`path` is the backend's, `backends.NAME`).
    pub fn new(
        c: &ComfyConfig,
        http: reqwest::Client,
        path: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let workflow = Workflow::load(
            &c.workflow,
            &c.inputs,
            &format!("{path}.workflow"),
            &format!("{path}.inputs"),
        );
        let edit = c.edit_workflow.as_ref().map(|file| {
            Workflow::load(
                file,
                &c.edit_inputs,
                &format!("{path}.edit_workflow"),
                &format!("{path}.edit_inputs"),
            )
        });
        let (workflow, edit) = match (workflow, edit.transpose()) {
            (Ok(w), Ok(e)) => (w, e),
            (w, e) => {
                let mut errors = w.err().unwrap_or_default();
                errors.extend(e.err().unwrap_or_default());
                return Err(errors);
            }
        };
        Ok(ComfyBackend {
            http,
            base: c.base_url.trim_end_matches('/').to_string(),
            workflow,
            edit,
            edit_denoise: c.edit_denoising_strength,
            variation_denoise: c.variation_denoising_strength,
            generation: c.generation(),
            poll_interval: c.poll_interval,
            timeout: c.timeout,
            probe_interval: c.probe_interval,
        })
    }

    /// The generation workflow with this request's values written in.
    pub fn graph_for(&self, call: &UpstreamCall<'_>, prompt: &str, seed: u64) -> Value {
        Self::fill(&self.workflow, &self.generation, call, prompt, seed, None)
    }

    fn fill(
        workflow: &Workflow,
        generation: &LocalGeneration,
        call: &UpstreamCall<'_>,
        prompt: &str,
        seed: u64,
        uploaded: Option<&Uploaded>,
    ) -> Value {
        let r = call.request;
        let sampling = local::sampling(generation, r);
        let mut graph = workflow.graph.clone();
        for (field, target) in &workflow.inputs {
            let value = match (field.as_str(), uploaded) {
                ("image", Some(u)) => json!(u.image),
                ("mask", Some(Uploaded { mask: Some(m), .. })) => json!(m),
                ("denoise", Some(u)) => json!(u.denoise),
                _ => Value::Null,
            };
            if !value.is_null() {
                target.set(&mut graph, value);
                continue;
            }
            let value = match field.as_str() {
                "prompt" => json!(prompt),
                "negative_prompt" => json!(generation.negative_prompt),
                "seed" => json!(seed),
                "width" => json!(r.size.width),
                "height" => json!(r.size.height),
                "batch_size" => json!(r.n),
                "steps" => json!(sampling.steps),
                "cfg" => json!(sampling.cfg),
                "checkpoint" => match &generation.checkpoint {
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

impl ComfyBackend {
    /// Uploads an edit's first image (and its mask, or an all-transparent one when the
    /// workflow takes a mask and the request has none: edit everywhere) under names made from
    /// their content, so a repeat reuses the file on the node instead of adding one.
    async fn upload_inputs(
        &self,
        call: &UpstreamCall<'_>,
        inputs: &EditInputs,
        edit: &Workflow,
    ) -> Result<Uploaded, BackendError> {
        let first = &inputs.images[0];
        let image = self
            .upload(call, first.bytes.clone(), first.format.extension())
            .await?;
        let mask = if edit.maps("mask") {
            let bytes = match &inputs.mask {
                Some(m) => m.bytes.clone(),
                None => {
                    let size = first.size;
                    tokio::task::spawn_blocking(move || clear_mask(size.width, size.height))
                        .await
                        .map_err(|e| BackendError::BadResponse(format!("mask: {e}")))??
                }
            };
            Some(self.upload(call, bytes, "png").await?)
        } else {
            None
        };
        let denoise = match inputs.operation {
            Operation::Variation => self.variation_denoise,
            _ => self.edit_denoise,
        };
        Ok(Uploaded {
            image,
            mask,
            denoise,
        })
    }

    /// `POST /upload/image` into the node's input folder; the name the node gave it.
    async fn upload(
        &self,
        call: &UpstreamCall<'_>,
        bytes: bytes::Bytes,
        extension: &str,
    ) -> Result<String, BackendError> {
        let digest = hex::encode(&Sha256::digest(&bytes)[..16]);
        let name = format!("imagegate_{digest}.{extension}");
        let len = bytes.len() as u64;
        let part = reqwest::multipart::Part::stream_with_length(reqwest::Body::from(bytes), len)
            .file_name(name.clone());
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("overwrite", "true");
        let (status, answer) = self
            .json_call(
                self.http
                    .post(format!("{}/upload/image", self.base))
                    .multipart(form),
                call,
            )
            .await?;
        if !(200..300).contains(&status) {
            return Err(BackendError::Status {
                status,
                message: format!("image upload refused: {answer}"),
            });
        }
        Ok(answer["name"].as_str().unwrap_or(&name).to_string())
    }
}

/// A PNG of `width` x `height` with alpha 0 everywhere: "edit all of it", in OpenAI's terms
/// and in `LoadImageMask`'s (alpha channel).
fn clear_mask(width: u32, height: u32) -> Result<bytes::Bytes, BackendError> {
    let img = image::RgbaImage::new(width, height);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| BackendError::BadResponse(format!("cannot encode a mask: {e}")))?;
    Ok(bytes::Bytes::from(out.into_inner()))
}

#[async_trait]
impl Backend for ComfyBackend {
    fn kind(&self) -> &'static str {
        "comfyui"
    }

    /// Edits and variations when the node has an `edit_workflow`.
    fn can(&self, operation: Operation) -> bool {
        operation == Operation::Generation || self.edit.is_some()
    }

    async fn generate(&self, call: UpstreamCall<'_>) -> Result<Generation, BackendError> {
        super::translate::require_plain_png(call.request)?;
        let prompt = local::prompt(&self.generation, call.request);
        let revised = (prompt != call.request.prompt).then(|| prompt.clone());
        let seed = local::seed(&self.generation, &call.request.prompt);
        let client_id = hex::encode(rand::random::<[u8; 16]>());
        let graph = match (&call.request.inputs, &self.edit) {
            (None, _) => self.graph_for(&call, &prompt, seed),
            (Some(inputs), Some(edit)) => {
                let uploaded = self.upload_inputs(&call, inputs, edit).await?;
                Self::fill(
                    edit,
                    &self.generation,
                    &call,
                    &prompt,
                    seed,
                    Some(&uploaded),
                )
            }
            (Some(_), None) => {
                return Err(BackendError::Workflow(
                    "this node has no edit_workflow".into(),
                ))
            }
        };
        let body = json!({"prompt": graph, "client_id": client_id});

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
