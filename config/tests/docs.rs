//! The docs cannot drift from the parser: every ```yaml block in README.md and docs/*.md is
//! parsed and validated by the real config parser, as if it were a file in `examples/`. The
//! only problem allowed is a file (or a folder of models) the example names that this checkout
//! does not have.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ```yaml blocks of a Markdown file, with the line each starts on.
fn yaml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == "```yaml" => current = Some((i + 2, String::new())),
            Some(_) if fence.starts_with("```") => out.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    more.sort();
    docs.extend(more);
    docs
}

#[test]
fn every_yaml_block_in_the_docs_is_a_valid_config() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, block) in yaml_blocks(&text) {
            checked += 1;
            let as_file = root().join("examples").join("docs-example.yaml");
            if let Err(errors) = sluice_config::parse(&block, &as_file) {
                let missing_file =
                    |m: &str| m.ends_with("not found") || m.contains("holds no `<model_id>/model.onnx`");
                for e in errors.0.iter().filter(|e| !missing_file(&e.message)) {
                    problems.push(format!("{}:{line}: {e}", rel(&doc)));
                }
            }
        }
    }
    assert!(checked >= 3, "found only {checked} yaml blocks");
    assert!(problems.is_empty(), "docs disagree with the config parser:\n{}", problems.join("\n"));
}

#[test]
fn a_wrong_field_in_a_doc_block_would_be_caught() {
    let block =
        "applications:\n  - name: a\n    deployments:\n      - {name: m, model: x.onnx, max_bach_size: 4}\n";
    let errors = sluice_config::parse(block, &root().join("examples").join("x.yaml")).unwrap_err();
    assert!(errors.0.iter().any(|e| !e.message.ends_with("not found")), "{errors}");
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
