//! The engine end to end with test step kinds: validation, ordering, caching, concurrency, failure,
//! cancellation and sweeps.

use crate::common;

use common::{output_of, test_kinds, wait_hold_started, Project};
use dusflow::engine::{self, RunOptions, StepStatus};
use dusflow::workflow::{Workflow, WorkflowError};
use tokio_util::sync::CancellationToken;

const CHAIN: &str = r#"
[workflow]
name = "chain"
seed = 1

[datasets.words]
path = "words.txt"

[steps.c]
kind = "text"
text = "C"
inputs = { from = ["b"] }

[steps.b]
kind = "text"
text = "B"
inputs = { from = ["a", "words"] }

[steps.a]
kind = "text"
text = "A"

[steps.other]
kind = "text"
text = "O"
"#;

fn opts(jobs: usize) -> RunOptions {
    RunOptions {
        jobs: Some(jobs),
        ..RunOptions::default()
    }
}

async fn run(
    p: &Project,
    registry: &dusflow::steps::Registry,
    jobs: usize,
) -> dusflow::engine::RunSummary {
    engine::run(
        &p.workflow(),
        registry,
        opts(jobs),
        CancellationToken::new(),
    )
    .await
    .expect("run")
}

#[tokio::test]
async fn steps_run_after_their_inputs_and_see_their_outputs() {
    let k = test_kinds();
    let p = Project::new(CHAIN);
    p.write("words.txt", "hello");
    let summary = run(&p, &k.registry, 1).await;
    assert!(summary.succeeded(), "{summary:?}");
    let order = k.log.names();
    let pos = |s: &str| order.iter().position(|n| n == s).unwrap();
    assert!(pos("a") < pos("b") && pos("b") < pos("c"), "{order:?}");
    assert_eq!(output_of(&summary, "c"), "C|B|A|hello");
}

#[tokio::test]
async fn unchanged_workflow_reruns_nothing_and_an_edit_reruns_only_what_it_affects() {
    let k = test_kinds();
    let p = Project::new(CHAIN);
    p.write("words.txt", "hello");
    assert_eq!(run(&p, &k.registry, 2).await.count("ran"), 4);
    k.log.clear();

    let again = run(&p, &k.registry, 2).await;
    assert_eq!((again.count("ran"), again.count("cached")), (0, 4));
    assert!(k.log.names().is_empty());

    // A parameter of `b` changes: b and its dependent c rerun, a and other do not.
    p.edit("text = \"B\"", "text = \"B2\"");
    let s = run(&p, &k.registry, 2).await;
    let mut ran = k.log.names();
    ran.sort();
    assert_eq!(ran, ["b", "c"]);
    assert_eq!(output_of(&s, "c"), "C|B2|A|hello");
    k.log.clear();

    // The dataset file changes: same steps rerun.
    p.write("words.txt", "world");
    let s = run(&p, &k.registry, 2).await;
    let mut ran = k.log.names();
    ran.sort();
    assert_eq!(ran, ["b", "c"]);
    assert_eq!(output_of(&s, "c"), "C|B2|A|world");
    k.log.clear();

    // Reverting the parameter finds the earlier artifacts again (content-addressed).
    p.edit("text = \"B2\"", "text = \"B\"");
    p.write("words.txt", "hello");
    let s = run(&p, &k.registry, 2).await;
    assert_eq!(s.count("ran"), 0, "{s:?}");
}

#[tokio::test]
async fn force_reruns_a_cached_step_only() {
    let k = test_kinds();
    let p = Project::new(CHAIN);
    p.write("words.txt", "hello");
    run(&p, &k.registry, 2).await;
    k.log.clear();
    let options = RunOptions {
        force: ["b".to_string()].into(),
        ..opts(2)
    };
    let s = engine::run(
        &p.workflow(),
        &k.registry,
        options,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(k.log.names(), ["b"]);
    assert!(s.succeeded());
}

#[tokio::test]
async fn defaults_apply_per_kind_and_enter_the_cache_key() {
    let k = test_kinds();
    let p = Project::new(
        r#"
[workflow]
name = "d"
[defaults.text]
repeat = 2
[steps.x]
kind = "text"
text = "ab"
[steps.y]
kind = "text"
text = "c"
repeat = 3
"#,
    );
    let s = run(&p, &k.registry, 2).await;
    assert_eq!(output_of(&s, "x"), "abab");
    assert_eq!(output_of(&s, "y"), "ccc");
    k.log.clear();
    p.edit("repeat = 2", "repeat = 1");
    run(&p, &k.registry, 2).await;
    assert_eq!(
        k.log.names(),
        ["x"],
        "only the step that used the default reruns"
    );
}

#[tokio::test]
async fn independent_steps_overlap_in_time() {
    let k = test_kinds();
    // Each `meet` step fails unless all three are running at the same moment.
    let p = Project::new(
        r#"
[workflow]
name = "overlap"
[steps.m1]
kind = "meet"
parties = 3
[steps.m2]
kind = "meet"
parties = 3
[steps.m3]
kind = "meet"
parties = 3
"#,
    );
    let s = run(&p, &k.registry, 3).await;
    assert!(s.succeeded(), "{s:?}");
    assert_eq!(s.count("ran"), 3);
}

#[tokio::test]
async fn a_steps_time_is_its_own_run_time_and_waiting_for_a_slot_is_counted_apart() {
    let k = test_kinds();
    let p = Project::new(
        r#"
[workflow]
name = "queue"
[steps.first]
kind = "text"
text = "1"
sleep_ms = 400
[steps.second]
kind = "text"
text = "2"
sleep_ms = 400
"#,
    );
    // One job slot: the second step waits for the first, but its own time is its 400 ms, not 800.
    let s = run(&p, &k.registry, 1).await;
    assert!(s.succeeded(), "{s:?}");
    for step in &s.steps {
        let run = step.duration.as_secs_f64();
        assert!((0.39..0.75).contains(&run), "{}: run {run}", step.name);
    }
    let waited: Vec<f64> = s.steps.iter().map(|x| x.queued.as_secs_f64()).collect();
    assert!(
        waited.iter().any(|&w| w >= 0.35) && waited.iter().any(|&w| w < 0.1),
        "one step waited for the other: {waited:?}"
    );
    assert!(s.wall.as_secs_f64() >= 0.8, "{:?}", s.wall);
    let table = engine::summary::render_summary(&s);
    assert!(table.contains("waited"), "{table}");
    assert!(table.contains("ran, 0 cached"), "{table}");
    let again = run(&p, &k.registry, 1).await;
    assert!(again
        .steps
        .iter()
        .all(|x| x.duration.is_zero() && x.queued.is_zero()));
}

#[tokio::test]
async fn a_failing_step_stops_its_dependents_but_not_unrelated_branches() {
    let k = test_kinds();
    let p = Project::new(CHAIN);
    p.write("words.txt", "hello");
    p.edit("text = \"B\"", "text = \"B\"\nfail = true");
    let s = run(&p, &k.registry, 2).await;
    assert!(
        matches!(&s.step("b").unwrap().status, StepStatus::Failed(m) if m.contains("asked to fail"))
    );
    assert!(matches!(&s.step("c").unwrap().status, StepStatus::Skipped(m) if m.contains("`b`")));
    assert_eq!(s.step("a").unwrap().status, StepStatus::Ran);
    assert_eq!(s.step("other").unwrap().status, StepStatus::Ran);
    assert!(
        !s.step("b").unwrap().dir.exists(),
        "a failed step leaves no artifact"
    );
}

#[tokio::test]
async fn a_missing_input_file_blocks_the_steps_that_need_it() {
    let k = test_kinds();
    let p = Project::new(CHAIN); // words.txt is not written
    let plan = engine::plan_workflow(
        engine::load(&p.workflow(), &k.registry, &opts(1)).unwrap(),
        &opts(1),
    )
    .unwrap();
    let text = engine::summary::render_plan(&plan);
    assert!(text.contains("blocked") && text.contains("words"), "{text}");
    let s = run(&p, &k.registry, 2).await;
    assert!(
        matches!(&s.step("b").unwrap().status, StepStatus::Blocked(m) if m.contains("words.txt"))
    );
    assert_eq!(s.step("a").unwrap().status, StepStatus::Ran);
}

#[tokio::test]
async fn shutdown_cancels_running_steps_and_leaves_no_artifact() {
    let k = test_kinds();
    let p = Project::new(
        r#"
[workflow]
name = "cancel"
[steps.long]
kind = "hold"
[steps.after]
kind = "text"
text = "x"
inputs = { from = "long" }
"#,
    );
    let shutdown = CancellationToken::new();
    let registry = k.registry.clone();
    let wf = p.workflow();
    let token = shutdown.clone();
    let handle =
        tokio::spawn(async move { engine::run(&wf, &registry, opts(2), token).await.unwrap() });
    let started = k.hold_started.clone();
    tokio::task::spawn_blocking(move || wait_hold_started(&started, 1))
        .await
        .unwrap();
    shutdown.cancel();
    let s = handle.await.unwrap();
    assert_eq!(s.step("long").unwrap().status, StepStatus::Cancelled);
    assert!(matches!(
        s.step("after").unwrap().status,
        StepStatus::Skipped(_)
    ));
    assert!(!s.step("long").unwrap().dir.exists());
    // Nothing is complete, so the next run starts the step again.
    let plan = engine::plan_workflow(
        engine::load(&p.workflow(), &k.registry, &opts(1)).unwrap(),
        &opts(1),
    )
    .unwrap();
    assert_eq!(plan.to_run(), 2);
}

#[tokio::test]
async fn sweeps_expand_to_named_points_and_a_downstream_step_consumes_all_of_them() {
    let k = test_kinds();
    let p = Project::new(
        r#"
[workflow]
name = "sweep"
[steps.s]
kind = "text"
text = "t"
sweep = { text = ["x", "y"], repeat = [1, 2] }
[steps.table]
kind = "text"
text = "T"
inputs = { from = "s" }
[steps.each]
kind = "text"
text = "E"
sweep = { "inputs.from" = ["s[text=x,repeat=1]", "s[text=y,repeat=2]"] }
"#,
    );
    let wf = Workflow::load(&p.workflow(), &k.registry).unwrap();
    let names: Vec<&str> = wf.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "s[text=x,repeat=1]",
            "s[text=x,repeat=2]",
            "s[text=y,repeat=1]",
            "s[text=y,repeat=2]",
            "table",
            "each[from=s[text=x,repeat=1]]",
            "each[from=s[text=y,repeat=2]]"
        ]
    );
    let s = run(&p, &k.registry, 2).await;
    assert!(s.succeeded(), "{s:?}");
    assert_eq!(output_of(&s, "table"), "T|x|xx|y|yy");
    assert_eq!(output_of(&s, "each[from=s[text=y,repeat=2]]"), "E|yy");
}

#[tokio::test]
async fn a_step_can_read_a_named_part_of_another_steps_output() {
    let k = test_kinds();
    let p = Project::new(
        r#"
[workflow]
name = "parts"

[steps.stages]
kind = "text"
text = "S"
parts = 2

[steps.second]
kind = "text"
text = "X"
inputs = { from = ["stages/part-2", "stages/part-1"] }
"#,
    );
    let summary = run(&p, &k.registry, 1).await;
    assert!(summary.succeeded(), "{summary:?}");
    assert_eq!(output_of(&summary, "second"), "X|S2|S1");

    // An unknown part is an error naming the step's parts; a step without parts says so.
    let err = errors_of(
        &std::fs::read_to_string(p.workflow())
            .unwrap()
            .replace("stages/part-1", "stages/part-3"),
        &k.registry,
    );
    let text = err.to_string();
    assert!(
        text.contains("step `stages` has no part `part-3`")
            && text.contains("its parts: part-1, part-2"),
        "{text}"
    );
    let err = errors_of(
        &std::fs::read_to_string(p.workflow())
            .unwrap()
            .replace("parts = 2", ""),
        &k.registry,
    );
    assert!(
        err.to_string().contains("step `stages` has no parts"),
        "{err}"
    );
}

fn errors_of(text: &str, registry: &dusflow::steps::Registry) -> WorkflowError {
    let p = Project::new(text);
    match Workflow::load(&p.workflow(), registry) {
        Ok(_) => panic!("workflow should be invalid"),
        Err(e) => e,
    }
}

#[test]
fn every_error_is_reported_at_once_with_line_column_and_key() {
    let k = test_kinds();
    let e = errors_of(
        r#"[workflow]
name = "bad"
colour = "blue"

[steps.a]
kind = "text"
text = 3

[steps.b]
kind = "text"
text = "x"
rpeat = 2

[steps.c]
kind = "txet"

[steps.d]
kind = "text"
text = "y"
inputs = { from = ["aa"] }

[steps.e]
kind = "text"
text = "z"
repeat = 1000
"#,
        &k.registry,
    );
    let rendered = e.to_string();
    let find = |key: &str| {
        e.diagnostics
            .iter()
            .find(|d| d.key == key)
            .unwrap_or_else(|| panic!("no error for {key} in:\n{rendered}"))
    };
    assert_eq!(e.diagnostics.len(), 6, "{rendered}");
    let d = find("workflow.colour");
    assert_eq!((d.line, d.column), (3, 1), "{d}");
    let d = find("steps.a.text");
    assert_eq!(d.line, 7);
    assert!(d.message.contains("string"), "{d}");
    let d = find("steps.b.rpeat");
    assert_eq!(d.line, 12);
    assert!(d.message.contains("unknown field"), "{d}");
    let d = find("steps.c.kind");
    assert_eq!(d.line, 15);
    assert!(d.message.contains("did you mean `text`"), "{d}");
    let d = find("steps.d.inputs.from");
    assert_eq!((d.line, d.column), (20, 20));
    assert!(d.message.contains("did you mean `a`"), "{d}");
    let d = find("steps.e.repeat");
    assert_eq!(d.line, 25);
    assert!(d.message.contains("at most 100"));
    assert!(
        rendered.contains("flow.toml:12:1: steps.b.rpeat:"),
        "{rendered}"
    );
}

#[test]
fn a_cycle_names_its_steps_and_where_they_are() {
    let k = test_kinds();
    let e = errors_of(
        r#"[workflow]
name = "cycle"

[steps.a]
kind = "text"
text = "a"
inputs = { from = "c" }

[steps.b]
kind = "text"
text = "b"
inputs = { from = "a" }

[steps.c]
kind = "text"
text = "c"
inputs = { from = "b" }

[steps.free]
kind = "text"
text = "f"
"#,
        &k.registry,
    );
    assert_eq!(e.diagnostics.len(), 1, "{e}");
    let d = &e.diagnostics[0];
    assert!(d.message.contains("cycle: a -> b -> c -> a"), "{d}");
    assert_eq!(d.line, 4, "{d}");
}

#[test]
fn input_types_and_counts_are_checked() {
    let k = test_kinds();
    let e = errors_of(
        r#"[workflow]
name = "types"
[models.base]
path = "m"
[steps.a]
kind = "text"
text = "a"
inputs = { from = "base", into = "a" }
"#,
        &k.registry,
    );
    let text = e.to_string();
    assert!(
        text.contains("`base` is a model, but input `from` takes a files or a dataset"),
        "{text}"
    );
    assert!(text.contains("has no input `into`"), "{text}");
    assert!(text.contains("flow.toml:8:"), "{text}");
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    let k = test_kinds();
    let e = errors_of(
        "[workflow]\nname = \"x\"\n[steps.a\nkind = 1\n",
        &k.registry,
    );
    assert_eq!(e.diagnostics[0].line, 3, "{e}");
    assert!(e.diagnostics[0].message.starts_with("TOML syntax"), "{e}");
}

#[test]
fn graph_renders_dot_and_mermaid() {
    let k = test_kinds();
    let p = Project::new(CHAIN);
    let wf = Workflow::load(&p.workflow(), &k.registry).unwrap();
    let dot = dusflow::workflow::render::dot(&wf);
    assert!(
        dot.starts_with("digraph") && dot.contains("\"step:a\" -> \"step:b\" [label=\"from\"]"),
        "{dot}"
    );
    let mermaid = dusflow::workflow::render::mermaid(&wf);
    assert!(
        mermaid.starts_with("flowchart LR") && mermaid.contains("-->|from|"),
        "{mermaid}"
    );
}

const VARIANTS: &str = r#"[workflow]
name = "variants"

[defaults.text]
repeat = 1

[steps.a]
kind = "text"
text = "a"

[steps.b]
kind = "text"
text = "b"
inputs = { from = "a" }

[variants.loud.defaults.text]
repeat = 3

[variants.loud.steps.b]
text = "B"

[variants.broken.steps.a]
rpeat = 2

[variants.broken.stepz.a]
text = "x"
"#;

#[test]
fn a_variant_overlays_its_tables_and_the_file_stays_as_written_without_it() {
    let k = test_kinds();
    // `broken`'s misspelt section is reported even when another variant (or none) is chosen.
    let text = VARIANTS.replace("[variants.broken.stepz.a]\ntext = \"x\"\n", "");
    let p = Project::new(&text);
    let plain = Workflow::load(&p.workflow(), &k.registry).unwrap();
    assert_eq!(plain.variant, None);
    assert_eq!(plain.step("b").unwrap().config_json["text"], "b");
    assert_eq!(plain.step("b").unwrap().config_json["repeat"], 1);
    let loud = Workflow::load_variant(&p.workflow(), &k.registry, Some("loud")).unwrap();
    assert_eq!(loud.variant.as_deref(), Some("loud"));
    let (a, b) = (loud.step("a").unwrap(), loud.step("b").unwrap());
    // Tables merge key by key: `b` keeps its inputs and gets the variant's text and defaults.
    assert_eq!(b.config_json["text"], "B");
    assert_eq!(b.config_json["repeat"], 3);
    assert_eq!(a.config_json["text"], "a");
    assert_eq!(a.config_json["repeat"], 3);
    assert_eq!(b.upstream().collect::<Vec<_>>(), ["a"]);
}

#[test]
fn variant_problems_are_reported_at_the_variants_lines() {
    let k = test_kinds();
    let p = Project::new(VARIANTS);
    let errors =
        |variant: Option<&str>| match Workflow::load_variant(&p.workflow(), &k.registry, variant) {
            Ok(_) => panic!("{variant:?} should not load"),
            Err(e) => e,
        };
    // A misspelt section in any variant, whichever is chosen.
    for chosen in [None, Some("loud")] {
        let e = errors(chosen);
        assert_eq!(e.diagnostics.len(), 1, "{e}");
        let d = &e.diagnostics[0];
        assert_eq!(
            (d.key.as_str(), d.line),
            ("variants.broken.stepz", 25),
            "{d}"
        );
        assert!(d.message.contains("did you mean `steps`"), "{d}");
    }
    let text = VARIANTS.replace("[variants.broken.stepz.a]\ntext = \"x\"\n", "");
    let p = Project::new(&text);
    let load = |variant| Workflow::load_variant(&p.workflow(), &k.registry, Some(variant));
    // A bad key inside the chosen variant: at its own line in the [variants] section.
    let e = load("broken").err().unwrap();
    let d = &e.diagnostics[0];
    assert_eq!((d.key.as_str(), d.line), ("steps.a.rpeat", 23), "{e}");
    // An unknown variant names the ones there are.
    let e = load("lound").err().unwrap();
    assert!(
        e.diagnostics[0].message.contains("did you mean `loud`")
            && e.diagnostics[0].message.contains("loud, broken"),
        "{e}"
    );
    let p = Project::new("[workflow]\nname = \"plain\"\n");
    let e = Workflow::load_variant(&p.workflow(), &k.registry, Some("loud"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("has no [variants] table"), "{e}");
}
