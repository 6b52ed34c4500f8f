//! The docs' Ray Serve configs cannot drift from the mapping: every ```yaml ray block in
//! README.md and docs/*.md goes through the same conversion as a `serve deploy` body, as if its
//! paths started at `examples/`. The only problem allowed is a file this checkout does not have.

use std::path::PathBuf;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The ```yaml ray blocks of a Markdown file, with the line each starts on.
fn ray_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            None if fence == "```yaml ray" => current = Some((i + 2, String::new())),
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

#[test]
fn every_ray_config_in_the_docs_maps_onto_sluice() {
    let mut docs = vec![root().join("README.md")];
    docs.extend(std::fs::read_dir(root().join("docs")).unwrap().map(|e| e.unwrap().path()));
    let mut checked = 0;
    let mut problems = Vec::new();
    for doc in docs.iter().filter(|p| p.extension().is_some_and(|e| e == "md")) {
        for (line, block) in ray_blocks(&std::fs::read_to_string(doc).unwrap()) {
            checked += 1;
            let at = format!("{}:{line}", doc.display());
            let body: Value = match serde_saphyr::from_str(&block) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{at}: not YAML: {e}"));
                    continue;
                }
            };
            if !sluice_server::ray_serve::schema::is_ray_config(&body) {
                problems.push(format!("{at}: not told apart from a Sluice config"));
            }
            if let Err(errors) =
                sluice_server::ray_serve::convert::convert(&body, &root().join("examples"), None)
            {
                let real = errors.0.iter().filter(|e| !e.msg.ends_with("not found"));
                problems.extend(real.map(|e| format!("{at}: {}: {}", e.loc, e.msg)));
            }
        }
    }
    assert!(checked >= 1, "found no ```yaml ray block");
    assert!(problems.is_empty(), "docs disagree with the Ray mapping:\n{}", problems.join("\n"));
}
