//! The PEFT adapter format: `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `...lora_B.weight` (`[out, r]`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{LoraAdapter, LoraConfig, LoraError, Result, TargetModules};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> LoraError {
    LoraError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// An adapter read from disk: its config and, per module path, (A, B).
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub weights: BTreeMap<String, (Tensor, Tensor)>,
}

/// `adapter_config.json` as PEFT 0.21 writes it for a LoRA on a causal LM.
pub fn adapter_config_json(
    cfg: &LoraConfig,
    target_names: &[String],
    base_model: Option<&str>,
) -> Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": cfg.alpha,
        "lora_bias": false,
        "lora_dropout": cfg.dropout,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": cfg.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": target_names,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": cfg.use_rslora
    })
}

/// Write an adapter directory; files appear complete or not at all.
pub fn save(
    dir: &Path,
    cfg: &LoraConfig,
    adapters: &[(String, &LoraAdapter)],
    base_model: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(adapters.len() * 2);
    let mut names = BTreeSet::new();
    for (path, a) in adapters {
        tensors.push((
            format!("{PREFIX}{path}.lora_A.weight"),
            a.a.as_tensor().to_dtype(DType::F32)?,
        ));
        tensors.push((
            format!("{PREFIX}{path}.lora_B.weight"),
            a.b.as_tensor().to_dtype(DType::F32)?,
        ));
        names.insert(path.rsplit('.').next().unwrap_or(path).to_string());
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((
                n.clone(),
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("shape and bytes agree");
            (n.clone(), view)
        })
        .collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let weights = dir.join(WEIGHTS_FILE);
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.partial"));
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| invalid(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &weights).map_err(io(&weights))?;

    let names: Vec<String> = names.into_iter().collect();
    let config = adapter_config_json(cfg, &names, base_model);
    let path = dir.join(CONFIG_FILE);
    let tmp = dir.join(format!(".{CONFIG_FILE}.partial"));
    let text = serde_json::to_string_pretty(&config).expect("JSON serializes") + "\n";
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn field<'a>(v: &'a Value, path: &Path, name: &str) -> Result<&'a Value> {
    v.get(name)
        .ok_or_else(|| invalid(path, format!("field `{name}` is missing")))
}

/// Read a PEFT LoRA adapter directory.
pub fn load(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let config = read_config(dir)?;
    load_weights(dir, config, device)
}

/// An adapter directory's `adapter_config.json`, checked as [`load`] checks it.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read(&path).map_err(io(&path))?;
    let v: Value = serde_json::from_slice(&text).map_err(|source| LoraError::Json {
        path: path.clone(),
        source,
    })?;
    let peft_type = field(&v, &path, "peft_type")?.as_str().unwrap_or("");
    if peft_type != "LORA" {
        return Err(invalid(
            &path,
            format!("field `peft_type`: {peft_type:?} is not LORA"),
        ));
    }
    for (flag, what) in [
        ("use_dora", "DoRA"),
        ("fan_in_fan_out", "fan_in_fan_out weights"),
    ] {
        if v.get(flag).and_then(Value::as_bool).unwrap_or(false) {
            return Err(invalid(
                &path,
                format!("field `{flag}`: {what} adapters are not supported"),
            ));
        }
    }
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if v.get(pattern)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(invalid(
                &path,
                format!("field `{pattern}`: per-module ranks are not supported"),
            ));
        }
    }
    if v.get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return Err(invalid(&path, "field `bias`: only \"none\" is supported"));
    }
    let r = field(&v, &path, "r")?
        .as_u64()
        .ok_or_else(|| invalid(&path, "field `r` must be a positive integer"))?
        as usize;
    let alpha = field(&v, &path, "lora_alpha")?
        .as_f64()
        .ok_or_else(|| invalid(&path, "field `lora_alpha` must be a number"))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let use_rslora = v
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let target_modules = match field(&v, &path, "target_modules")? {
        Value::String(s) => TargetModules::Keyword(s.clone()),
        Value::Array(a) => TargetModules::Names(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        ),
        _ => {
            return Err(invalid(
                &path,
                "field `target_modules` must be a string or a list",
            ))
        }
    };
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora,
    };
    config
        .validate()
        .map_err(|e| invalid(&path, e.to_string()))?;
    Ok(config)
}

fn load_weights(dir: &Path, config: LoraConfig, device: &Device) -> Result<PeftAdapter> {
    let r = config.r;
    let wpath = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&wpath).map_err(io(&wpath))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| invalid(&wpath, e.to_string()))?;
    let mut parts: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (name, view) in st.tensors() {
        let stem = name.strip_prefix(PREFIX).unwrap_or(&name);
        let (module, which) = if let Some(m) = stem.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = stem.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            return Err(invalid(
                &wpath,
                format!("tensor {name}: not a lora_A/lora_B weight"),
            ));
        };
        let t =
            to_tensor(&view, device).map_err(|m| invalid(&wpath, format!("tensor {name}: {m}")))?;
        let dims = t.dims();
        let ok = dims.len() == 2
            && if which == 0 {
                dims[0] == r
            } else {
                dims[1] == r
            };
        if !ok {
            return Err(invalid(
                &wpath,
                format!("tensor {name}: shape {dims:?} does not fit rank {r}"),
            ));
        }
        let entry = parts.entry(module.to_string()).or_default();
        if which == 0 {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    let mut weights = BTreeMap::new();
    for (module, (a, b)) in parts {
        match (a, b) {
            (Some(a), Some(b)) => {
                weights.insert(module, (a, b));
            }
            _ => {
                return Err(invalid(
                    &wpath,
                    format!("{module}: has only one of lora_A and lora_B"),
                ))
            }
        }
    }
    Ok(PeftAdapter { config, weights })
}

fn to_tensor(
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    use safetensors::Dtype;
    let shape = view.shape().to_vec();
    let d = view.data();
    let t = match view.dtype() {
        Dtype::F32 => Tensor::from_vec(bytemuck::pod_collect_to_vec::<u8, f32>(d), shape, device),
        Dtype::BF16 => Tensor::from_vec(
            bytemuck::pod_collect_to_vec::<u8, half::bf16>(d),
            shape,
            device,
        ),
        Dtype::F16 => Tensor::from_vec(
            bytemuck::pod_collect_to_vec::<u8, half::f16>(d),
            shape,
            device,
        ),
        other => return Err(format!("dtype {other:?}: expected F32, BF16 or F16")),
    };
    t.and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| e.to_string())
}
