//! `polyhead models`: the loaded model set, or one model in detail.

use clap::Args;
use polyhead_client::{json, v1};

use super::layout::{indent, table};
use super::{Output, Session};

/// Arguments of `polyhead models`.
#[derive(Debug, Args)]
pub struct ModelsArgs {
    /// Show only this model (the backbone or a head), with its labels.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
}

/// Runs `polyhead models`.
pub(crate) async fn run(session: &Session, out: &Output, args: ModelsArgs) -> anyhow::Result<()> {
    let client = session.connect().await?;
    match args.name {
        Some(name) => {
            let info = client.get_model(&name).await?;
            out.emit(&json::ModelInfo::from(&info), || model(&info))
        }
        None => {
            let list = client.list_models().await?;
            out.emit(&json::ListModelsResponse::from(&list), || models(&list))
        }
    }
}

/// The model set: the backbone in detail, then one line per head.
fn models(list: &v1::ListModelsResponse) -> String {
    let mut text = format!("model set: {}\n", list.model_set);
    if let Some(backbone) = &list.backbone {
        text.push_str(&format!("backbone: {}\n", title(backbone)));
        text.push_str(&indent(&details(backbone), 2));
    }
    if list.heads.is_empty() {
        text.push_str("heads: none\n");
        return text;
    }
    text.push_str("heads:\n");
    let header = ["NAME", "KIND", "LABELS", "VERSION", "PROVIDER"].map(str::to_owned);
    let mut rows = vec![header.to_vec()];
    rows.extend(list.heads.iter().map(|head| {
        vec![
            head.name.clone(),
            kind(head).to_owned(),
            head.labels.len().to_string(),
            head.version.clone(),
            head.execution_provider.clone(),
        ]
    }));
    text.push_str(&indent(&table(&rows, &[2]), 2));
    text
}

/// One model in detail, labels included.
fn model(info: &v1::ModelInfo) -> String {
    let role = match v1::ModelRole::try_from(info.role) {
        Ok(v1::ModelRole::Backbone) => "backbone".to_owned(),
        Ok(v1::ModelRole::Head) => format!("{} head", kind(info)),
        _ => "model".to_owned(),
    };
    let mut text = format!("{role}: {}\n", title(info));
    text.push_str(&indent(&details(info), 2));
    if !info.labels.is_empty() {
        text.push_str(&format!("  labels ({}):\n", info.labels.len()));
        let rows: Vec<Vec<String>> = info
            .labels
            .iter()
            .enumerate()
            .map(|(id, label)| vec![id.to_string(), label.clone()])
            .collect();
        text.push_str(&indent(&table(&rows, &[0]), 4));
    }
    text
}

/// `name (version V, file F)`.
fn title(info: &v1::ModelInfo) -> String {
    let mut facts = Vec::new();
    if !info.version.is_empty() {
        facts.push(format!("version {}", info.version));
    }
    if !info.file.is_empty() {
        facts.push(info.file.clone());
    }
    if facts.is_empty() {
        info.name.clone()
    } else {
        format!("{} ({})", info.name, facts.join(", "))
    }
}

/// Input size, resize policy, execution provider and the tensors.
fn details(info: &v1::ModelInfo) -> String {
    let mut facts = Vec::new();
    if info.role == v1::ModelRole::Backbone as i32 {
        let size = match (info.input_width, info.input_height) {
            (0, _) | (_, 0) => "dynamic".to_owned(),
            (w, h) => format!("{w}x{h}"),
        };
        facts.push(format!("input size {size}"));
        if !info.resize.is_empty() {
            facts.push(format!("resize {}", info.resize));
        }
    }
    if !info.execution_provider.is_empty() {
        facts.push(format!("execution provider {}", info.execution_provider));
    }
    let mut text = String::new();
    if !facts.is_empty() {
        text.push_str(&facts.join(", "));
        text.push('\n');
    }
    let rows: Vec<Vec<String>> = [("input", &info.inputs), ("output", &info.outputs)]
        .into_iter()
        .flat_map(|(role, tensors)| tensors.iter().map(move |t| tensor_row(role, t)))
        .collect();
    text.push_str(&table(&rows, &[]));
    text
}

/// `role  name  [d0, d1, ...]  datatype`, dynamic dimensions as `?`.
fn tensor_row(role: &str, tensor: &v1::TensorInfo) -> Vec<String> {
    let dims: Vec<String> = tensor
        .shape
        .iter()
        .map(|&d| if d < 0 { "?".to_owned() } else { d.to_string() })
        .collect();
    vec![
        role.to_owned(),
        tensor.name.clone(),
        format!("[{}]", dims.join(", ")),
        tensor.datatype.clone(),
    ]
}

/// A head's kind in plain words.
fn kind(info: &v1::ModelInfo) -> &'static str {
    match v1::HeadKind::try_from(info.kind) {
        Ok(v1::HeadKind::Detection) => "detection",
        Ok(v1::HeadKind::Segmentation) => "segmentation",
        Ok(v1::HeadKind::Action) => "action",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;

    fn tensor(name: &str, shape: &[i64]) -> v1::TensorInfo {
        v1::TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            datatype: "float32".into(),
        }
    }

    fn model_set() -> v1::ListModelsResponse {
        v1::ListModelsResponse {
            model_set: "demo".into(),
            backbone: Some(v1::ModelInfo {
                name: "vit".into(),
                role: v1::ModelRole::Backbone as i32,
                version: "1".into(),
                file: "backbone.onnx".into(),
                input_width: 224,
                input_height: 224,
                execution_provider: "cpu".into(),
                inputs: vec![tensor("pixel_values", &[-1, 3, 224, 224])],
                outputs: vec![tensor("features", &[-1, 256, 14, 14])],
                resize: "letterbox".into(),
                ..Default::default()
            }),
            heads: vec![v1::ModelInfo {
                name: "coco".into(),
                role: v1::ModelRole::Head as i32,
                kind: v1::HeadKind::Detection as i32,
                version: "2".into(),
                labels: vec!["person".into(), "bicycle".into()],
                execution_provider: "cuda:0".into(),
                ..Default::default()
            }],
        }
    }

    #[test]
    fn model_set_listing() {
        assert_eq!(
            models(&model_set()),
            "model set: demo\n\
             backbone: vit (version 1, backbone.onnx)\n\
             \x20 input size 224x224, resize letterbox, execution provider cpu\n\
             \x20 input   pixel_values  [?, 3, 224, 224]  float32\n\
             \x20 output  features      [?, 256, 14, 14]  float32\n\
             heads:\n\
             \x20 NAME  KIND       LABELS  VERSION  PROVIDER\n\
             \x20 coco  detection       2  2        cuda:0\n"
        );
    }

    #[test]
    fn one_head_with_labels() {
        let head = &model_set().heads[0];
        assert_eq!(
            model(head),
            "detection head: coco (version 2)\n\
             \x20 execution provider cuda:0\n\
             \x20 labels (2):\n\
             \x20   0  person\n\
             \x20   1  bicycle\n"
        );
    }

    #[test]
    fn models_flags() -> Result<(), clap::Error> {
        let cli = Cli::try_parse_valid(["polyhead", "models", "coco"])?;
        let Command::Models(args) = cli.command else {
            panic!("not models");
        };
        assert_eq!(args.name.as_deref(), Some("coco"));
        Ok(())
    }
}
