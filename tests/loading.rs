//! Start-up checks: a model set that does not fit together, or a device that cannot be used,
//! makes loading fail with a message naming the file and the mismatch.

use std::path::Path;

use polyhead_server::engine::Device;
use polyhead_server::{Config, ModelSet};

use crate::common::models_dir;

/// A copy of the test model set that a test may break.
fn copy_of_models() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(models_dir()).expect("model set") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name"))).expect("copy");
        }
    }
    dir
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).expect("read");
    assert!(text.contains(from), "{} has no '{from}'", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).expect("write");
}

fn load_error(dir: &Path) -> String {
    match ModelSet::load(&Config::for_models(dir)) {
        Ok(_) => panic!("the broken model set in {} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn channel_mismatch_names_the_backbone_file() {
    let dir = copy_of_models();
    edit(
        &dir.path().join("polyhead.toml"),
        "channels = 256",
        "channels = 999",
    );
    let message = load_error(dir.path());
    assert!(
        message.contains("backbone.onnx") && message.contains("999"),
        "{message}"
    );
}

#[test]
fn label_count_mismatch_names_the_head_and_labels() {
    let dir = copy_of_models();
    let labels = dir.path().join("coco80.txt");
    let text = std::fs::read_to_string(&labels).expect("labels");
    let fewer: Vec<_> = text.lines().take(79).collect();
    std::fs::write(&labels, fewer.join("\n")).expect("write");
    let message = load_error(dir.path());
    assert!(message.contains("detection_head.onnx"), "{message}");
    assert!(message.contains("79 labels of coco80.txt"), "{message}");
}

#[test]
fn a_head_consuming_an_unknown_feature_is_refused() {
    let dir = copy_of_models();
    edit(
        &dir.path().join("polyhead.toml"),
        r#"inputs = ["stage4"]"#,
        r#"inputs = ["stage9"]"#,
    );
    let message = load_error(dir.path());
    assert!(
        message.contains("polyhead.toml") && message.contains("'stage9'"),
        "{message}"
    );
}

#[test]
fn a_missing_model_file_is_named() {
    let dir = copy_of_models();
    std::fs::remove_file(dir.path().join("segmentation_head.onnx")).expect("rm");
    let message = load_error(dir.path());
    assert!(
        message.contains("segmentation_head.onnx") && message.contains("does not exist"),
        "{message}"
    );
}

#[test]
fn a_corrupt_model_file_is_named() {
    let dir = copy_of_models();
    std::fs::write(dir.path().join("action_head.onnx"), b"not an onnx file").expect("write");
    let message = load_error(dir.path());
    assert!(message.contains("action_head.onnx"), "{message}");
}

/// The CPU build of ONNX Runtime has no CUDA provider: asking for CUDA is refused unless CPU
/// fallback is allowed. (On a GPU machine with the GPU build, both would run on CUDA.)
#[test]
fn cuda_without_a_usable_gpu_refuses_or_falls_back_as_configured() {
    let mut config = Config::for_models(models_dir());
    config.runtime.device = Device::Cuda(0);
    match ModelSet::load(&config) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("cuda:0") && message.contains("--allow-cpu-fallback"),
                "{message}"
            );
            config.runtime.allow_cpu_fallback = true;
            let models = ModelSet::load(&config).expect("falls back to the CPU");
            assert_eq!(models.device, Device::Cpu);
        }
        Ok(models) => assert_eq!(models.device, Device::Cuda(0), "CUDA is usable here"),
    }
}
