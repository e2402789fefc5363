//! The workflow DAG as Graphviz DOT or Mermaid text (`dus graph`).

use super::{InputRef, Workflow};
use std::fmt::Write;

/// DOT source: models and datasets as notes, steps as boxes labelled with their kind.
pub fn dot(workflow: &Workflow) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "digraph {:?} {{\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];",
        workflow.settings.name
    );
    for name in workflow.models.keys() {
        let _ = writeln!(
            out,
            "  {:?} [shape=cylinder, label={:?}];",
            node_id("model", name),
            format!("model: {name}")
        );
    }
    for name in workflow.datasets.keys() {
        let _ = writeln!(
            out,
            "  {:?} [shape=note, label={:?}];",
            node_id("dataset", name),
            format!("dataset: {name}")
        );
    }
    for step in &workflow.steps {
        let label = format!("{}\\n({})", step.name, step.kind.name());
        let _ = writeln!(
            out,
            "  {:?} [shape=box, style=rounded, label=\"{}\"];",
            node_id("step", &step.name),
            label.replace('"', "\\\"")
        );
        for (slot, refs) in &step.inputs {
            for r in refs {
                let _ = writeln!(
                    out,
                    "  {:?} -> {:?} [label={:?}];",
                    ref_id(r),
                    node_id("step", &step.name),
                    slot
                );
            }
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid flowchart source (renders on GitHub and in many editors).
pub fn mermaid(workflow: &Workflow) -> String {
    let mut ids = std::collections::HashMap::new();
    let mut id = |key: String| -> String {
        let n = ids.len();
        ids.entry(key).or_insert_with(|| format!("n{n}")).clone()
    };
    let mut out = String::from("flowchart LR\n");
    for name in workflow.models.keys() {
        let _ = writeln!(
            out,
            "  {}[(\"model: {}\")]",
            id(node_id("model", name)),
            escape(name)
        );
    }
    for name in workflow.datasets.keys() {
        let _ = writeln!(
            out,
            "  {}[/\"dataset: {}\"/]",
            id(node_id("dataset", name)),
            escape(name)
        );
    }
    for step in &workflow.steps {
        let _ = writeln!(
            out,
            "  {}(\"{}<br/><i>{}</i>\")",
            id(node_id("step", &step.name)),
            escape(&step.name),
            step.kind.name()
        );
    }
    for step in &workflow.steps {
        for (slot, refs) in &step.inputs {
            for r in refs {
                let _ = writeln!(
                    out,
                    "  {} -->|{}| {}",
                    id(ref_id(r)),
                    escape(slot),
                    id(node_id("step", &step.name))
                );
            }
        }
    }
    out
}

fn node_id(kind: &str, name: &str) -> String {
    format!("{kind}:{name}")
}

fn ref_id(r: &InputRef) -> String {
    match r {
        InputRef::Model(n) => node_id("model", n),
        InputRef::Dataset(n) => node_id("dataset", n),
        InputRef::Step(n) | InputRef::Part(n, _) => node_id("step", n),
    }
}

fn escape(s: &str) -> String {
    s.replace('"', "#quot;")
}
