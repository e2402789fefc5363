//! `dus plugin new | build | check` through the library: every scaffold of every kind and
//! language builds, loads and runs on the sample (languages whose toolchain is missing are
//! skipped with a notice).

use crate::plugins_common;

use dusflow::plugins::build::{self, MissingTool};
use dusflow::plugins::cli::{run_to, PluginCommand};
use dusflow::plugins::scaffold_languages;
use dusflow::plugins::PluginKind;
use plugins_common::*;

fn run(cmd: PluginCommand) -> anyhow::Result<String> {
    let mut out = Vec::new();
    run_to(cmd, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn scaffolds_of_every_kind_and_language_build_and_pass_check() {
    let root = tempfile::tempdir().unwrap();
    for lang in scaffold_languages() {
        for kind in PluginKind::ALL {
            let name = format!("my-{kind}");
            let dir = root.path().join(format!("{lang:?}-{kind}").to_lowercase());
            let created = run(PluginCommand::New {
                kind,
                name: name.clone(),
                lang,
                dir: Some(dir.clone()),
            })
            .unwrap();
            assert!(
                created.contains(&format!("created {kind} plugin '{name}'")),
                "{created}"
            );
            let check = PluginCommand::Check {
                file: dir.clone(),
                params: "{}".into(),
                sample: None,
                grant_read: vec![],
                timeout_ms: 10_000,
            };
            match run(check) {
                Ok(report) => {
                    assert!(
                        report.contains(&format!("plugin:      {name} 0.1.0")),
                        "{lang:?}: {report}"
                    );
                    assert!(
                        report.contains(&format!("kind:        {kind} (dus:plugin@0.1.0)")),
                        "{report}"
                    );
                    assert!(
                        report.contains(&format!("dus:plugin/{}@0.1.0", kind.interface())),
                        "{report}"
                    );
                    let sample = match kind {
                        PluginKind::LayerPolicy => "32-layer model -> 43 layers",
                        PluginKind::DataFilter => "keep",
                        PluginKind::MergeRule => "model.layers.0.self_attn.q_proj.weight [16, 16]",
                    };
                    assert!(report.contains(sample), "{lang:?} {kind}: {report}");
                }
                Err(e) if e.downcast_ref::<MissingTool>().is_some() => {
                    eprintln!("SKIPPED {lang:?} {kind} scaffold: {e}");
                }
                Err(e) => panic!("{lang:?} {kind} scaffold fails check: {e:#}"),
            }
        }
    }
}

#[test]
fn new_refuses_a_non_empty_folder_and_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "x").unwrap();
    let new = |name: &str| PluginCommand::New {
        kind: PluginKind::DataFilter,
        name: name.into(),
        lang: dusflow::plugins::Lang::Rust,
        dir: Some(dir.path().to_path_buf()),
    };
    assert!(run(new("ok-name"))
        .unwrap_err()
        .to_string()
        .contains("not empty"));
    assert!(run(new("Bad Name"))
        .unwrap_err()
        .to_string()
        .contains("lowercase"));
}

#[test]
fn build_prints_the_cached_component_and_rebuilds_only_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("p");
    run(PluginCommand::New {
        kind: PluginKind::LayerPolicy,
        name: "rebuild-probe".into(),
        lang: dusflow::plugins::Lang::Rust,
        dir: Some(plugin.clone()),
    })
    .unwrap();
    let first = run(PluginCommand::Build {
        path: plugin.clone(),
        watch: false,
        output: None,
    })
    .unwrap();
    let again = run(PluginCommand::Build {
        path: plugin.clone(),
        watch: false,
        output: None,
    })
    .unwrap();
    assert_eq!(first, again, "an unchanged folder hits the cache");
    assert!(build::source_files(&plugin)
        .iter()
        .any(|f| f.ends_with("src/lib.rs")));
    assert!(
        build::source_files(&plugin)
            .iter()
            .any(|f| f.ends_with("sdk/wit/0.1.0/plugin.wit")),
        "SDK sources count"
    );
    let lib = plugin.join("src/lib.rs");
    let text = std::fs::read_to_string(&lib)
        .unwrap()
        .replace("repeats: u32,", "repeats: u32, // changed");
    std::fs::write(&lib, text).unwrap();
    let changed = run(PluginCommand::Build {
        path: plugin.clone(),
        watch: false,
        output: None,
    })
    .unwrap();
    assert_ne!(first, changed, "a source change is a new build");
    let loaded = host()
        .load(
            std::path::Path::new(changed.trim()),
            &Default::default(),
            &Default::default(),
        )
        .unwrap();
    assert_eq!(loaded.info().name, "rebuild-probe");
}

#[test]
fn watch_rebuilds_when_a_source_changes_and_only_then() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().to_path_buf();
    // A plugin.toml build that just copies its source: watching is about when, not how.
    std::fs::write(
        plugin.join("plugin.toml"),
        "[build]\ncommand = 'cat src.txt > \"$DUS_OUT\"'\n",
    )
    .unwrap();
    std::fs::write(plugin.join("src.txt"), "version 1").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (watched, cache_dir) = (plugin.clone(), cache.path().to_path_buf());
    std::thread::spawn(move || {
        build::watch(&watched, &cache_dir, |built| {
            let content = std::fs::read_to_string(built.unwrap()).unwrap();
            let done = content == "version 2";
            tx.send(content).unwrap();
            if done {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .unwrap();
    });
    let wait = || {
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("a build")
    };
    assert_eq!(wait(), "version 1");
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::create_dir_all(plugin.join("target")).unwrap();
    std::fs::write(plugin.join("target/ignored.txt"), "build output").unwrap();
    std::fs::write(plugin.join("src.txt"), "version 2").unwrap();
    assert_eq!(
        wait(),
        "version 2",
        "the ignored file triggered no build of its own"
    );
}
