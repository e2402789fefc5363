//! Parsing a workflow file into a [`Workflow`]: sections, defaults, sweeps, references and the DAG.
//!
//! Works on toml's spanned document so that every problem can name its line and column; the typed
//! sections and each step kind's parameters are deserialized from spanned values, so serde's own errors
//! (unknown keys, wrong types) carry positions too.

use super::diagnostics::{hint, DiagnosticSink, WorkflowError};
use super::{InputRef, Step, Workflow};
use dusflow_core::record_format::FormatChoice;
use dusflow_core::spec::{DatasetSpec, ModelSpec, PathList, PluginSpec, WorkflowSettings};
use dusflow_core::step::{
    AnyConfig, ArtifactKind, ArtifactPart, CheckContext, ErasedStepKind, InputSlot, InputSlots,
    Registry,
};
use indexmap::IndexMap;
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

type Value<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<Cow<'i, str>>;

const SECTIONS: [&str; 6] = [
    "workflow", "defaults", "models", "datasets", "plugins", "steps",
];
const STEP_RESERVED: [&str; 4] = ["kind", "inputs", "sweep", "description"];
/// Most points one step's sweep may expand to: each point is a step with its own artifact.
const MAX_SWEEP_POINTS: usize = 1000;
/// Most steps a workflow may have after sweeps are expanded.
const MAX_STEPS: usize = 10_000;

pub(super) fn load(
    path: &Path,
    registry: &Registry,
    variant: Option<&str>,
) -> Result<Workflow, WorkflowError> {
    let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let source = match std::fs::read_to_string(&file) {
        Ok(s) => s,
        Err(e) => {
            let mut sink = DiagnosticSink::new(&file, "");
            sink.error(0..0, "", format!("cannot read workflow file: {e}"));
            return Err(sink.finish().unwrap_err());
        }
    };
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut sink = DiagnosticSink::new(&file, &source);
    let (root, syntax_errors) = DeTable::parse_recoverable(&source);
    for e in &syntax_errors {
        sink.error(
            e.span().unwrap_or(0..0),
            "",
            format!("TOML syntax: {}", e.message()),
        );
    }
    if sink.has_errors() {
        return Err(sink.finish().unwrap_err());
    }
    let mut root = root.into_inner();
    apply_variant(&mut root, variant, &mut sink);
    if sink.has_errors() {
        return Err(sink.finish().unwrap_err());
    }
    let loader = Loader {
        registry,
        dir: &dir,
        source: &source,
    };
    let mut workflow = loader.load(&file, &root, &mut sink);
    if let Some(w) = workflow.as_mut() {
        w.variant = variant.map(str::to_string);
    }
    sink.finish()?;
    Ok(workflow.expect("a workflow without diagnostics is complete"))
}

struct Loader<'a> {
    registry: &'a Registry,
    dir: &'a Path,
    source: &'a str,
}

/// One `[steps.NAME]` table after defaults and sweep expansion, before references are resolved.
struct RawStep<'i> {
    name: String,
    base: String,
    header: Range<usize>,
    kind_name: String,
    point: Vec<(String, String)>,
    params: DeTable<'i>,
    params_span: Range<usize>,
    inputs: Vec<(Key<'i>, Vec<Spanned<String>>)>,
    /// Input slots set by a sweep axis (`sweep = { "inputs.model" = [...] }`).
    swept_slots: Vec<String>,
    description: Option<String>,
}

impl<'a> Loader<'a> {
    fn load<'i>(
        &self,
        file: &Path,
        root: &DeTable<'i>,
        sink: &mut DiagnosticSink,
    ) -> Option<Workflow> {
        for (key, _) in root.iter() {
            if !SECTIONS.contains(&key.get_ref().as_ref()) {
                sink.error(
                    key.span(),
                    key.get_ref().as_ref(),
                    format!(
                        "unknown section{}; expected one of {}",
                        hint(key.get_ref(), SECTIONS),
                        SECTIONS.join(", ")
                    ),
                );
            }
        }
        let settings = match root.get("workflow") {
            Some(v) => self.typed::<WorkflowSettings>(v, "workflow", sink),
            None => {
                sink.error(
                    0..0,
                    "workflow",
                    "missing [workflow] table (it needs at least `name`)",
                );
                None
            }
        };
        let mut models: IndexMap<String, ModelSpec> = self.named_section(root, "models", sink);
        let mut datasets: IndexMap<String, DatasetSpec> =
            self.named_section(root, "datasets", sink);
        let mut plugins: IndexMap<String, PluginSpec> = self.named_section(root, "plugins", sink);
        for m in models.values_mut() {
            m.path = self.dir.join(&m.path);
            m.adapter = m.adapter.as_ref().map(|a| self.dir.join(a));
        }
        for d in datasets.values_mut() {
            d.path = match &d.path {
                PathList::One(p) => PathList::One(self.dir.join(p)),
                PathList::Many(v) => PathList::Many(v.iter().map(|p| self.dir.join(p)).collect()),
            };
        }
        for p in plugins.values_mut() {
            p.path = self.dir.join(&p.path);
            for d in p.grants.read.iter_mut().chain(p.grants.write.iter_mut()) {
                *d = self.dir.join(&*d);
            }
        }
        self.check_datasets(root, &datasets, &plugins, sink);
        self.check_special_files(root, &models, &datasets, &plugins, sink);
        self.check_unique_names(root, sink);

        let defaults = self.defaults(root, sink);
        let raw_steps = self.raw_steps(root, &defaults, sink);
        let raw_steps = self.expand_swept_inputs(raw_steps, root, sink);
        let steps = self.resolve_steps(raw_steps, &models, &datasets, &plugins, sink);
        let steps = self.order(steps, sink);

        let settings = settings?;
        let output_dir = self.dir.join(
            settings
                .output
                .clone()
                .unwrap_or_else(|| Path::new("runs").join(&settings.name)),
        );
        Some(Workflow {
            file: file.to_path_buf(),
            dir: self.dir.to_path_buf(),
            settings,
            output_dir,
            models,
            datasets,
            plugins,
            steps: steps?,
            variant: None,
        })
    }

    /// Deserializes `value` into `T`, reporting the first serde error at its position.
    fn typed<T: DeserializeOwned>(
        &self,
        value: &Value<'_>,
        key: &str,
        sink: &mut DiagnosticSink,
    ) -> Option<T> {
        match serde_path_to_error::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(v) => Some(v),
            Err(e) => {
                let path = join_key(key, &e.path().to_string());
                let inner = e.into_inner();
                sink.error(
                    inner.span().unwrap_or(value.span()),
                    clean_path(&path),
                    serde_message(&inner),
                );
                None
            }
        }
    }

    /// A section of named tables, e.g. `[models.base]`, `[models.other]`.
    fn named_section<T: DeserializeOwned>(
        &self,
        root: &DeTable<'_>,
        section: &str,
        sink: &mut DiagnosticSink,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        let Some(table) = root
            .get(section)
            .and_then(|v| expect_table(v, section, sink))
        else {
            return out;
        };
        for (name, value) in table.iter() {
            let key = format!("{section}.{}", name.get_ref());
            if check_name(name, &key, sink) {
                if let Some(v) = self.typed::<T>(value, &key, sink) {
                    out.insert(name.get_ref().to_string(), v);
                }
            }
        }
        out
    }

    fn check_datasets(
        &self,
        root: &DeTable<'_>,
        datasets: &IndexMap<String, DatasetSpec>,
        plugins: &IndexMap<String, PluginSpec>,
        sink: &mut DiagnosticSink,
    ) {
        for (name, spec) in datasets {
            if let FormatChoice::Known(format) = spec.format {
                for key in spec.fields.keys() {
                    if !format.fields().contains(&key.as_str()) {
                        let at = format!("datasets.{name}.fields.{key}");
                        sink.error(
                            lookup(root, &at).unwrap_or(0..0),
                            at,
                            format!(
                                "`{key}` is not a field of format {} (its fields: {})",
                                format.name(),
                                format.fields().join(", ")
                            ),
                        );
                    }
                }
            }
            for (i, filter) in spec.filters.iter().enumerate() {
                if !plugins.contains_key(filter) {
                    let span =
                        lookup(root, &format!("datasets.{name}.filters[{i}]")).unwrap_or(0..0);
                    sink.error(
                        span,
                        format!("datasets.{name}.filters"),
                        format!(
                            "unknown plugin `{filter}`{}",
                            hint(filter, plugins.keys().map(String::as_str))
                        ),
                    );
                }
            }
        }
    }

    /// Inputs must be regular files or folders: reading a device (`/dev/zero`) or a FIFO never ends.
    /// Missing paths are fine here (the steps that need them are blocked when planned).
    fn check_special_files(
        &self,
        root: &DeTable<'_>,
        models: &IndexMap<String, ModelSpec>,
        datasets: &IndexMap<String, DatasetSpec>,
        plugins: &IndexMap<String, PluginSpec>,
        sink: &mut DiagnosticSink,
    ) {
        // (where the path is written, the key to report, the path)
        let mut paths: Vec<(String, String, &Path)> = Vec::new();
        for (name, m) in models {
            let key = format!("models.{name}.path");
            paths.push((key.clone(), key, &m.path));
        }
        for (name, d) in datasets {
            let key = format!("datasets.{name}.path");
            match &d.path {
                PathList::One(p) => paths.push((key.clone(), key, p)),
                PathList::Many(v) => paths.extend(
                    v.iter()
                        .enumerate()
                        .map(|(i, p)| (format!("{key}[{i}]"), key.clone(), p.as_path())),
                ),
            }
        }
        for (name, p) in plugins {
            let key = format!("plugins.{name}.path");
            paths.push((key.clone(), key, &p.path));
        }
        for (at, key, path) in paths {
            if let Some(what) = special_file_kind(path) {
                sink.error(
                    lookup(root, &at).unwrap_or(0..0),
                    key,
                    format!(
                        "{} is a {what}, not a file or folder: dusflow reads inputs to their end, which a {what} \
                         does not have",
                        path.display()
                    ),
                );
            }
        }
    }

    /// Models, datasets and steps share one namespace, since `inputs` refer to all three by name.
    fn check_unique_names(&self, root: &DeTable<'_>, sink: &mut DiagnosticSink) {
        let mut seen: HashMap<String, &str> = HashMap::new();
        for section in ["models", "datasets", "steps"] {
            let Some(DeValue::Table(t)) = root.get(section).map(Spanned::get_ref) else {
                continue;
            };
            for (name, _) in t.iter() {
                if let Some(other) = seen.insert(name.get_ref().to_string(), section) {
                    sink.error(
                        name.span(),
                        format!("{section}.{}", name.get_ref()),
                        format!("name `{}` is also used in [{other}]; inputs refer to names, so they must be unique", name.get_ref()),
                    );
                }
            }
        }
    }

    fn defaults<'i>(
        &self,
        root: &DeTable<'i>,
        sink: &mut DiagnosticSink,
    ) -> HashMap<String, DeTable<'i>> {
        let mut out = HashMap::new();
        let Some(table) = root
            .get("defaults")
            .and_then(|v| expect_table(v, "defaults", sink))
        else {
            return out;
        };
        for (kind, value) in table.iter() {
            let key = format!("defaults.{}", kind.get_ref());
            if self.registry.get(kind.get_ref()).is_none() {
                sink.error(
                    kind.span(),
                    key,
                    format!(
                        "unknown step kind{}; defaults are given per kind, e.g. [defaults.sft]",
                        hint(kind.get_ref(), self.registry.names())
                    ),
                );
                continue;
            }
            if let Some(t) = expect_table(value, &key, sink) {
                out.insert(kind.get_ref().to_string(), t.clone());
            }
        }
        out
    }

    fn raw_steps<'i>(
        &self,
        root: &DeTable<'i>,
        defaults: &HashMap<String, DeTable<'i>>,
        sink: &mut DiagnosticSink,
    ) -> Vec<RawStep<'i>> {
        let mut out = Vec::new();
        let Some(table) = root
            .get("steps")
            .and_then(|v| expect_table(v, "steps", sink))
        else {
            return out;
        };
        for (name, value) in table.iter() {
            let key = format!("steps.{}", name.get_ref());
            if !check_name(name, &key, sink) {
                continue;
            }
            let Some(step) = expect_table(value, &key, sink) else {
                continue;
            };
            let expanded = self.raw_step(name, value.span(), step, defaults, sink);
            if out.len() + expanded.len() > MAX_STEPS {
                sink.error(
                    name.span(),
                    key,
                    format!(
                        "the workflow expands to more than {MAX_STEPS} steps here (sweeps included); split it into \
                         several workflows"
                    ),
                );
                break;
            }
            out.extend(expanded);
        }
        out
    }

    /// One `[steps.NAME]` table, expanded into one entry per sweep point.
    fn raw_step<'i>(
        &self,
        name: &Key<'i>,
        span: Range<usize>,
        step: &DeTable<'i>,
        defaults: &HashMap<String, DeTable<'i>>,
        sink: &mut DiagnosticSink,
    ) -> Vec<RawStep<'i>> {
        let base = name.get_ref().to_string();
        let key = format!("steps.{base}");
        let kind_name = match step.get("kind").map(|v| (v.span(), v.get_ref())) {
            Some((_, DeValue::String(s))) => s.to_string(),
            Some((span, _)) => {
                sink.error(
                    span,
                    format!("{key}.kind"),
                    "expected a string naming a step kind",
                );
                return Vec::new();
            }
            None => {
                sink.error(
                    name.span(),
                    &key,
                    format!(
                        "missing `kind`; one of: {}",
                        self.registry.names().collect::<Vec<_>>().join(", ")
                    ),
                );
                return Vec::new();
            }
        };
        if self.registry.get(&kind_name).is_none() {
            let span = step.get("kind").map(Spanned::span).unwrap_or(name.span());
            sink.error(
                span,
                format!("{key}.kind"),
                format!(
                    "unknown step kind `{kind_name}`{}; known kinds: {}",
                    hint(&kind_name, self.registry.names()),
                    self.registry.names().collect::<Vec<_>>().join(", ")
                ),
            );
            return Vec::new();
        }
        let description = match step.get("description").map(|v| (v.span(), v.get_ref())) {
            Some((_, DeValue::String(s))) => Some(s.to_string()),
            Some((span, _)) => {
                sink.error(span, format!("{key}.description"), "expected a string");
                None
            }
            None => None,
        };
        let mut params = DeTable::new();
        for (k, v) in step.iter() {
            if !STEP_RESERVED.contains(&k.get_ref().as_ref()) {
                params.insert(k.clone(), v.clone());
            }
        }
        if let Some(d) = defaults.get(&kind_name) {
            merge_defaults(&mut params, d);
        }
        let inputs = match step.get("inputs") {
            Some(v) => self.inputs_table(v, &format!("{key}.inputs"), sink),
            None => Vec::new(),
        };
        let sweep = match step.get("sweep") {
            Some(v) => self.sweep_axes(v, &format!("{key}.sweep"), sink),
            None => Vec::new(),
        };

        let header = Some(step_span(self.source, &base))
            .filter(|s| !s.is_empty())
            .unwrap_or(name.span());
        let mut out = Vec::new();
        // Counted before expanding: a grid is the product of its axes, and expanding a huge one is what
        // must not happen.
        let points = sweep
            .iter()
            .try_fold(1usize, |n, (_, values)| n.checked_mul(values.len()))
            .filter(|&n| n <= MAX_SWEEP_POINTS);
        if points.is_none() {
            let sizes: Vec<String> = sweep.iter().map(|(_, v)| v.len().to_string()).collect();
            sink.error(
                step.get("sweep").map_or(name.span(), Spanned::span),
                format!("{key}.sweep"),
                format!(
                    "the sweep has {} points, more than the {MAX_SWEEP_POINTS} a step may have (each point is a step \
                     with its own artifact); sweep fewer values",
                    sizes.join(" × ")
                ),
            );
            return out;
        }
        for point in grid(&sweep) {
            let mut params = params.clone();
            let mut inputs = inputs.clone();
            let mut labels = Vec::new();
            let mut swept_slots = Vec::new();
            for (axis, value) in sweep.iter().zip(point) {
                let (axis_key, values) = axis;
                let value = &values[value];
                labels.push((label_key(axis_key.get_ref()), self.label_value(value)));
                if let Some(slot) = axis_key.get_ref().strip_prefix("inputs.") {
                    swept_slots.push(slot.to_string());
                    let refs = self.ref_list(value, &format!("{key}.sweep"), sink);
                    match inputs.iter_mut().find(|(k, _)| k.get_ref() == slot) {
                        Some(entry) => entry.1 = refs,
                        None => inputs.push((
                            Spanned::new(axis_key.span(), Cow::Owned(slot.to_string())),
                            refs,
                        )),
                    }
                } else {
                    set_path(&mut params, axis_key, value.clone());
                }
            }
            let name = if labels.is_empty() {
                base.clone()
            } else {
                let label: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{base}[{}]", label.join(","))
            };
            out.push(RawStep {
                name,
                base: base.clone(),
                header: header.clone(),
                kind_name: kind_name.clone(),
                point: labels,
                params,
                params_span: span.clone(),
                inputs,
                swept_slots,
                description: description.clone(),
            });
        }
        out
    }

    /// A sweep over a one-artifact slot (`sweep = { "inputs.model" = ["cpt"] }`) whose value names a swept
    /// step takes one point per point of that step: `eval[model=cpt[seed=1]]`, `eval[model=cpt[seed=2]]`, …
    /// (so a chain of seed sweeps needs no list of point names). Steps are expanded once the step they
    /// name is final, so chains of such sweeps expand in dependency order; what is left (a cycle) is
    /// reported later as a cycle.
    fn expand_swept_inputs<'i>(
        &self,
        mut raw: Vec<RawStep<'i>>,
        root: &DeTable<'i>,
        sink: &mut DiagnosticSink,
    ) -> Vec<RawStep<'i>> {
        // (step index, slot) whose one swept reference names a step with several points.
        let expandable = |raw: &[RawStep<'i>]| -> Vec<(usize, String, Vec<String>)> {
            let mut points_of: HashMap<&str, Vec<&str>> = HashMap::new();
            for r in raw {
                points_of.entry(&r.base).or_default().push(&r.name);
            }
            let mut found = Vec::new();
            for (i, r) in raw.iter().enumerate() {
                let Some(kind) = self.registry.get(&r.kind_name) else {
                    continue;
                };
                let InputSlots::Fixed(slots) = kind.inputs() else {
                    continue;
                };
                for slot in &r.swept_slots {
                    let single = slots.iter().any(|s| s.name == slot && !s.many);
                    let refs = r.inputs.iter().find(|(k, _)| k.get_ref() == slot.as_str());
                    if let (true, Some((_, refs))) = (single, refs) {
                        if let [one] = refs.as_slice() {
                            match points_of.get(one.get_ref().as_str()) {
                                Some(points) if points.len() > 1 && one.get_ref() != &r.base => {
                                    found.push((
                                        i,
                                        slot.clone(),
                                        points.iter().map(|p| p.to_string()).collect(),
                                    ));
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            found
        };
        loop {
            let found = expandable(&raw);
            let pending: std::collections::HashSet<&str> = found
                .iter()
                .map(|(i, _, _)| raw[*i].base.as_str())
                .collect();
            // Expand a step only when the step it names will not expand itself any more.
            let ready: Vec<(usize, String, Vec<String>)> = found
                .iter()
                .filter(|(i, slot, _)| {
                    let named = raw[*i]
                        .inputs
                        .iter()
                        .find(|(k, _)| k.get_ref() == slot.as_str())
                        .map(|(_, refs)| refs[0].get_ref().as_str());
                    !named.is_some_and(|n| pending.contains(n))
                })
                .cloned()
                .collect();
            if ready.is_empty() {
                return raw;
            }
            let mut replaced: HashMap<usize, Vec<RawStep<'i>>> = HashMap::new();
            let mut done = std::collections::HashSet::new();
            for (i, slot, points) in ready {
                if !done.insert(i) {
                    continue; // a second slot of the same step: the next round expands it
                }
                let r = &raw[i];
                let label = label_key(&format!("inputs.{slot}"));
                let expanded = points
                    .into_iter()
                    .map(|point| {
                        let mut inputs = r.inputs.clone();
                        for (k, refs) in inputs.iter_mut() {
                            if k.get_ref() == slot.as_str() {
                                *refs = vec![Spanned::new(refs[0].span(), point.clone())];
                            }
                        }
                        let labels: Vec<(String, String)> = r
                            .point
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    if *k == label {
                                        point.clone()
                                    } else {
                                        v.clone()
                                    },
                                )
                            })
                            .collect();
                        let text: Vec<String> =
                            labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        RawStep {
                            name: format!("{}[{}]", r.base, text.join(",")),
                            base: r.base.clone(),
                            header: r.header.clone(),
                            kind_name: r.kind_name.clone(),
                            point: labels,
                            params: r.params.clone(),
                            params_span: r.params_span.clone(),
                            inputs,
                            swept_slots: r.swept_slots.clone(),
                            description: r.description.clone(),
                        }
                    })
                    .collect();
                replaced.insert(i, expanded);
            }
            let mut next = Vec::with_capacity(raw.len());
            for (i, r) in raw.into_iter().enumerate() {
                match replaced.remove(&i) {
                    Some(points) => next.extend(points),
                    None => next.push(r),
                }
            }
            raw = next;
            if raw.len() > MAX_STEPS {
                let span = root.get("steps").map_or(0..0, Spanned::span);
                sink.error(
                    span,
                    "steps",
                    format!(
                        "the workflow expands to more than {MAX_STEPS} steps (sweeps over swept steps included); \
                         split it into several workflows"
                    ),
                );
                raw.truncate(MAX_STEPS);
                return raw;
            }
        }
    }

    fn inputs_table<'i>(
        &self,
        value: &Value<'i>,
        key: &str,
        sink: &mut DiagnosticSink,
    ) -> Vec<(Key<'i>, Vec<Spanned<String>>)> {
        let Some(table) = expect_table(value, key, sink) else {
            return Vec::new();
        };
        table
            .iter()
            .map(|(slot, v)| {
                (
                    slot.clone(),
                    self.ref_list(v, &format!("{key}.{}", slot.get_ref()), sink),
                )
            })
            .collect()
    }

    /// A reference (`"name"`) or a list of references.
    fn ref_list(
        &self,
        value: &Value<'_>,
        key: &str,
        sink: &mut DiagnosticSink,
    ) -> Vec<Spanned<String>> {
        match value.get_ref() {
            DeValue::String(s) => vec![Spanned::new(value.span(), s.to_string())],
            DeValue::Array(items) => items
                .iter()
                .filter_map(|item| match item.get_ref() {
                    DeValue::String(s) => Some(Spanned::new(item.span(), s.to_string())),
                    _ => {
                        sink.error(
                            item.span(),
                            key,
                            "expected the name of a model, dataset or step",
                        );
                        None
                    }
                })
                .collect(),
            _ => {
                sink.error(
                    value.span(),
                    key,
                    "expected a name or a list of names of models, datasets or steps",
                );
                Vec::new()
            }
        }
    }

    fn sweep_axes<'i>(
        &self,
        value: &Value<'i>,
        key: &str,
        sink: &mut DiagnosticSink,
    ) -> Vec<(Key<'i>, Vec<Value<'i>>)> {
        let Some(table) = expect_table(value, key, sink) else {
            return Vec::new();
        };
        let mut axes = Vec::new();
        for (axis, values) in table.iter() {
            let axis_name = axis.get_ref();
            if STEP_RESERVED.contains(&axis_name.as_ref()) || axis_name == "inputs" {
                sink.error(
                    axis.span(),
                    format!("{key}.{axis_name}"),
                    "cannot sweep this key; sweep parameters or `inputs.SLOT`",
                );
                continue;
            }
            match values.get_ref() {
                DeValue::Array(items) if !items.is_empty() => {
                    axes.push((axis.clone(), items.to_vec()))
                }
                _ => sink.error(
                    values.span(),
                    format!("{key}.{axis_name}"),
                    "expected a non-empty list of values to sweep",
                ),
            }
        }
        axes
    }

    /// How a swept value appears in a step name: the string itself, or the value as written.
    fn label_value(&self, value: &Value<'_>) -> String {
        match value.get_ref() {
            DeValue::String(s) => s.to_string(),
            _ => self.source[value.span()].trim().to_string(),
        }
    }

    /// Parses every step's parameters, then checks each against its kind and resolves its inputs.
    fn resolve_steps(
        &self,
        raw: Vec<RawStep<'_>>,
        models: &IndexMap<String, ModelSpec>,
        datasets: &IndexMap<String, DatasetSpec>,
        plugins: &IndexMap<String, PluginSpec>,
        sink: &mut DiagnosticSink,
    ) -> Option<Vec<Step>> {
        let mut points_of: IndexMap<String, Vec<String>> = IndexMap::new();
        let mut seed_of: HashMap<String, String> = HashMap::new();
        for r in &raw {
            points_of
                .entry(r.base.clone())
                .or_default()
                .push(r.name.clone());
            if let Some((_, seed)) = r.point.iter().find(|(k, _)| k == "seed") {
                seed_of.insert(r.name.clone(), seed.clone());
            }
        }
        // Output kinds and parts of every step are needed before any input can be type-checked.
        let (parsed, failed) = self.parse_steps(raw, sink);
        let names = Namespace {
            models,
            datasets,
            outputs: parsed
                .iter()
                .map(|p| (p.raw.name.clone(), p.kind.output(&p.config)))
                .collect(),
            parts_of: parsed
                .iter()
                .map(|p| (p.raw.name.clone(), p.kind.parts(&p.config)))
                .collect(),
            points_of,
            seed_of,
        };
        let plugin_names = PluginNames(plugins);
        let steps = parsed
            .into_iter()
            .map(|p| self.resolve_step(p, &names, &plugin_names, sink))
            .collect();
        (!failed).then_some(steps)
    }

    /// Deserializes each step's parameters with its kind; the second value says whether any failed.
    fn parse_steps<'i>(
        &self,
        raw: Vec<RawStep<'i>>,
        sink: &mut DiagnosticSink,
    ) -> (Vec<ParsedStep<'i>>, bool) {
        let mut parsed = Vec::new();
        let mut failed = false;
        for r in raw {
            let kind = self
                .registry
                .get(&r.kind_name)
                .expect("kind checked")
                .clone();
            let params = ValueDeserializer::from(Spanned::new(
                r.params_span.clone(),
                DeValue::Table(r.params.clone()),
            ));
            match kind.parse(params) {
                Ok((config, json)) => parsed.push(ParsedStep {
                    raw: r,
                    kind,
                    config,
                    json,
                }),
                Err(failure) => {
                    let key = join_key(&format!("steps.{}", r.base), &failure.path);
                    let span = failure.error.span().unwrap_or(r.header.clone());
                    sink.error(span, clean_path(&key), serde_message(&failure.error));
                    failed = true;
                }
            }
        }
        (parsed, failed)
    }

    /// One parsed step: its kind's checks, its dependencies, its inputs resolved and type-checked.
    fn resolve_step(
        &self,
        parsed: ParsedStep<'_>,
        names: &Namespace<'_>,
        plugins: &PluginNames<'_>,
        sink: &mut DiagnosticSink,
    ) -> Step {
        let ParsedStep {
            raw: r,
            kind,
            config,
            json,
        } = parsed;
        let key = format!("steps.{}", r.base);
        let seed = r
            .point
            .iter()
            .find(|(k, _)| k == "seed")
            .map(|(_, v)| v.as_str());
        let counts: HashMap<String, usize> = r
            .inputs
            .iter()
            .map(|(slot, refs)| {
                let n = refs
                    .iter()
                    .map(|name| names.points(name.get_ref(), seed).map_or(1, |p| p.len()))
                    .sum();
                (slot.get_ref().to_string(), n)
            })
            .collect();
        let input_datasets: HashMap<String, Vec<(String, DatasetSpec)>> = r
            .inputs
            .iter()
            .map(|(slot, refs)| {
                let specs = refs
                    .iter()
                    .filter_map(|name| {
                        let name = name.get_ref();
                        names
                            .datasets
                            .get(name)
                            .map(|spec| (name.to_string(), spec.clone()))
                    })
                    .collect();
                (slot.get_ref().to_string(), specs)
            })
            .collect();
        let step_check = StepCheck {
            plugins,
            input_counts: &counts,
            input_datasets: &input_datasets,
        };
        for issue in kind.check(&config, &step_check) {
            let full = join_key(&key, &issue.key);
            let span = lookup(&r.params, &issue.key).unwrap_or(r.header.clone());
            sink.error(span, full, issue.message);
        }
        let mut dependencies = kind.dependencies(&config);
        for plugin in &dependencies.plugins {
            if !plugins.has_plugin(plugin) {
                sink.error(
                    r.header.clone(),
                    &key,
                    format!("uses plugin `{plugin}`, which is not declared in [plugins]"),
                );
            }
        }
        dependencies.files = dependencies
            .files
            .iter()
            .map(|f| self.dir.join(f))
            .collect();

        let mut inputs: BTreeMap<String, Vec<InputRef>> = BTreeMap::new();
        for (slot, refs) in &r.inputs {
            let slot_key = format!("{key}.inputs.{}", slot.get_ref());
            let spec = match kind.inputs() {
                InputSlots::Any => None,
                InputSlots::Fixed(slots) => {
                    match slots.iter().find(|s| s.name == slot.get_ref().as_ref()) {
                        Some(s) => Some(*s),
                        None => {
                            let slot_names: Vec<&str> = slots.iter().map(|s| s.name).collect();
                            sink.error(
                                slot.span(),
                                slot_key,
                                format!(
                                    "step kind `{}` has no input `{}`{}; its inputs: {}",
                                    kind.name(),
                                    slot.get_ref(),
                                    hint(slot.get_ref(), slot_names.iter().copied()),
                                    slot_names.join(", ")
                                ),
                            );
                            continue;
                        }
                    }
                }
            };
            let resolved = resolve_slot(
                slot.span(),
                refs,
                spec,
                (&r.base, seed),
                names,
                &slot_key,
                sink,
            );
            inputs.insert(slot.get_ref().to_string(), resolved);
        }
        if let InputSlots::Fixed(slots) = kind.inputs() {
            for slot in slots
                .iter()
                .filter(|s| s.required && !inputs.contains_key(s.name))
            {
                sink.error(
                    r.header.clone(),
                    &key,
                    format!(
                        "step kind `{}` needs input `{}` ({}), e.g. inputs = {{ {} = \"NAME\" }}",
                        kind.name(),
                        slot.name,
                        accepted(slot),
                        slot.name
                    ),
                );
            }
        }
        Step {
            output: kind.output(&config),
            parts: kind.parts(&config),
            resources: kind.resources(&config),
            name: r.name,
            base: r.base,
            point: r.point,
            kind,
            config,
            config_json: json,
            inputs,
            dependencies,
            description: r.description,
        }
    }

    /// Orders steps so that every step comes after its inputs, keeping file order otherwise; reports cycles.
    fn order(&self, steps: Option<Vec<Step>>, sink: &mut DiagnosticSink) -> Option<Vec<Step>> {
        let steps = steps?;
        let index: HashMap<&str, usize> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut indegree = vec![0usize; steps.len()];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
        for (i, step) in steps.iter().enumerate() {
            let upstream: HashSet<usize> = step
                .upstream()
                .filter_map(|u| index.get(u).copied())
                .collect();
            indegree[i] = upstream.len();
            for u in upstream {
                dependents[u].push(i);
            }
        }
        let mut ready: BinaryHeap<std::cmp::Reverse<usize>> = (0..steps.len())
            .filter(|&i| indegree[i] == 0)
            .map(std::cmp::Reverse)
            .collect();
        let mut order = Vec::with_capacity(steps.len());
        while let Some(std::cmp::Reverse(i)) = ready.pop() {
            order.push(i);
            for &d in &dependents[i] {
                indegree[d] -= 1;
                if indegree[d] == 0 {
                    ready.push(std::cmp::Reverse(d));
                }
            }
        }
        if order.len() < steps.len() {
            let cycle = find_cycle(&steps, &index, &indegree);
            let names: Vec<&str> = cycle.iter().map(|&i| steps[i].name.as_str()).collect();
            let first = &steps[cycle[0]];
            let root_span = step_span(self.source, &first.base);
            sink.error(
                root_span,
                format!("steps.{}", first.base),
                format!("steps form a cycle: {} -> {}", names.join(" -> "), names[0]),
            );
            return None;
        }
        let mut slots: Vec<Option<Step>> = steps.into_iter().map(Some).collect();
        Some(
            order
                .into_iter()
                .map(|i| slots[i].take().expect("each step once"))
                .collect(),
        )
    }
}

/// One cycle among the steps left with unmet inputs after a topological sort.
/// Replaces `root` by the variant `name` of it: `[variants.NAME]` holds tables shaped like the file's own
/// (`[variants.NAME.steps.sft]`, `[variants.NAME.defaults.dpo]`, ...) whose keys replace the file's, tables
/// merged key by key. Without a name the variants are only checked for shape. Merged values keep their spans,
/// so a problem in a variant's key is reported at its line in the `[variants]` section.
fn apply_variant<'i>(root: &mut DeTable<'i>, name: Option<&str>, sink: &mut DiagnosticSink) {
    let Some((variants_key, variants)) = root.remove_entry("variants") else {
        if let Some(name) = name {
            sink.error(
                0..0,
                "variants",
                format!("no variant `{name}`: this workflow has no [variants] table"),
            );
        }
        return;
    };
    let DeValue::Table(variants) = variants.into_inner() else {
        sink.error(
            variants_key.span(),
            "variants",
            "expected a table of variants",
        );
        return;
    };
    let mut chosen = None;
    let mut names = Vec::new();
    for (variant_name, body) in variants {
        names.push(variant_name.get_ref().to_string());
        let label = format!("variants.{}", variant_name.get_ref());
        let DeValue::Table(body) = body.get_ref() else {
            sink.error(body.span(), label, "expected a table");
            continue;
        };
        for (section, _) in body.iter() {
            let section_name = section.get_ref().as_ref();
            if section_name == "variants" || !SECTIONS.contains(&section_name) {
                sink.error(
                    section.span(),
                    format!("{label}.{section_name}"),
                    format!(
                        "a variant changes the file's own sections{}; expected one of {}",
                        hint(section_name, SECTIONS),
                        SECTIONS.join(", ")
                    ),
                );
            }
        }
        if Some(variant_name.get_ref().as_ref()) == name {
            chosen = Some(body.clone());
        }
    }
    let Some(name) = name else { return };
    match chosen {
        Some(body) => merge_tables(root, body),
        None => sink.error(
            variants_key.span(),
            "variants",
            format!(
                "no variant `{name}`{}; this workflow has: {}",
                hint(name, names.iter().map(String::as_str)),
                names.join(", ")
            ),
        ),
    }
}

/// Overlays `over` on `base`: tables merge key by key, anything else replaces.
fn merge_tables<'i>(base: &mut DeTable<'i>, over: DeTable<'i>) {
    for (key, value) in over {
        let (span, value) = (value.span(), value.into_inner());
        match (base.get_mut(key.get_ref().as_ref()), value) {
            (Some(existing), DeValue::Table(over_table))
                if matches!(existing.get_ref(), DeValue::Table(_)) =>
            {
                if let DeValue::Table(base_table) = existing.get_mut() {
                    merge_tables(base_table, over_table);
                }
            }
            (_, value) => {
                base.insert(key, Spanned::new(span, value));
            }
        }
    }
}

fn find_cycle(steps: &[Step], index: &HashMap<&str, usize>, indegree: &[usize]) -> Vec<usize> {
    let start = (0..steps.len())
        .find(|&i| indegree[i] > 0)
        .expect("a step in a cycle");
    // Walk upstream edges among blocked steps until a step repeats.
    let mut path = vec![start];
    let mut at = start;
    loop {
        let next = steps[at]
            .upstream()
            .filter_map(|u| index.get(u).copied())
            .find(|&u| indegree[u] > 0)
            .expect("a blocked step has a blocked input");
        if let Some(pos) = path.iter().position(|&p| p == next) {
            let mut cycle = path[pos..].to_vec();
            cycle.reverse(); // upstream walk -> data-flow order
            let first = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, &s)| s)
                .map_or(0, |(i, _)| i);
            cycle.rotate_left(first);
            return cycle;
        }
        path.push(next);
        at = next;
    }
}

struct PluginNames<'a>(&'a IndexMap<String, PluginSpec>);

impl CheckContext for PluginNames<'_> {
    fn has_plugin(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// The checks' view of one step: the workflow's plugins and how many artifacts each input slot gets.
struct StepCheck<'a> {
    plugins: &'a PluginNames<'a>,
    input_counts: &'a HashMap<String, usize>,
    input_datasets: &'a HashMap<String, Vec<(String, DatasetSpec)>>,
}

impl CheckContext for StepCheck<'_> {
    fn has_plugin(&self, name: &str) -> bool {
        self.plugins.has_plugin(name)
    }
    fn input_count(&self, slot: &str) -> Option<usize> {
        Some(self.input_counts.get(slot).copied().unwrap_or(0))
    }
    fn input_datasets(&self, slot: &str) -> Vec<(String, DatasetSpec)> {
        self.input_datasets.get(slot).cloned().unwrap_or_default()
    }
}

fn accepted(slot: &InputSlot) -> String {
    let kinds: Vec<String> = slot.accepts.iter().map(|k| format!("a {k}")).collect();
    kinds.join(" or ")
}

/// Resolves `STEP/PART`: the named part of a step (of every point of a swept step).
/// A step whose parameters parsed.
struct ParsedStep<'i> {
    raw: RawStep<'i>,
    kind: Arc<dyn ErasedStepKind>,
    config: AnyConfig,
    json: serde_json::Value,
}

/// Everything an input may name: models, datasets, steps (by base name, expanded to their sweep points, or
/// by point name) and their parts.
struct Namespace<'a> {
    models: &'a IndexMap<String, ModelSpec>,
    datasets: &'a IndexMap<String, DatasetSpec>,
    points_of: IndexMap<String, Vec<String>>,
    /// The `seed` sweep label of each point that has one.
    seed_of: HashMap<String, String>,
    outputs: HashMap<String, ArtifactKind>,
    parts_of: HashMap<String, Vec<ArtifactPart>>,
}

impl Namespace<'_> {
    /// What `name` refers to, with each artifact's kind (several for a swept step); empty when nothing.
    /// The points of step `name` that a step with sweep label `seed` reads: seeds are replicates, so a step
    /// swept over `seed` reads the point of a seed-swept input with its own seed (`merge[seed=2]` reads
    /// `sft_a[seed=2]` and `sft_b[seed=2]`), and every point otherwise.
    fn points(&self, name: &str, seed: Option<&str>) -> Option<Vec<&String>> {
        let points = self.points_of.get(name)?;
        let matching: Vec<&String> = match seed {
            Some(seed) if points.iter().any(|p| self.seed_of.contains_key(p)) => points
                .iter()
                .filter(|p| self.seed_of.get(*p).map(String::as_str) == Some(seed))
                .collect(),
            _ => points.iter().collect(),
        };
        Some(matching)
    }

    /// What `name` refers to for a step with sweep label `seed`, with each artifact's kind (several for a
    /// swept step); empty when nothing.
    fn find(&self, name: &str, seed: Option<&str>) -> Vec<(InputRef, ArtifactKind)> {
        [
            self.models
                .get(name)
                .map(|_| vec![(InputRef::Model(name.to_string()), ArtifactKind::Model)]),
            self.datasets
                .get(name)
                .map(|_| vec![(InputRef::Dataset(name.to_string()), ArtifactKind::Dataset)]),
            self.points(name, seed).map(|points| {
                points
                    .into_iter()
                    .map(|p| {
                        (
                            InputRef::Step(p.clone()),
                            self.outputs.get(p).copied().unwrap_or(ArtifactKind::Files),
                        )
                    })
                    .collect()
            }),
            self.outputs
                .get(name)
                .filter(|_| !self.points_of.contains_key(name))
                .map(|k| vec![(InputRef::Step(name.to_string()), *k)]),
        ]
        .into_iter()
        .flatten()
        .flatten()
        .collect()
    }

    /// Every name an input may use, for "did you mean".
    fn all(&self) -> impl Iterator<Item = &str> {
        self.models
            .keys()
            .chain(self.datasets.keys())
            .chain(self.points_of.keys())
            .map(String::as_str)
    }
}

/// The artifacts the references of one input slot name, type-checked against the slot (`spec`, when the
/// kind has fixed slots). `step` is the base name of the step being resolved.
fn resolve_slot(
    slot_span: Range<usize>,
    refs: &[Spanned<String>],
    spec: Option<InputSlot>,
    (step, seed): (&str, Option<&str>),
    names: &Namespace<'_>,
    slot_key: &str,
    sink: &mut DiagnosticSink,
) -> Vec<InputRef> {
    let mut resolved = Vec::new();
    for reference in refs {
        let name = reference.get_ref();
        let found = names.find(name, seed);
        let found = match (found.is_empty(), name.rsplit_once('/')) {
            (true, Some((step, part))) => {
                match resolve_part(step, part, &names.points_of, &names.parts_of) {
                    Ok(found) => found,
                    Err(message) => {
                        sink.error(reference.span(), slot_key, message);
                        continue;
                    }
                }
            }
            _ => found,
        };
        if found.is_empty() {
            if let (Some(seed), true) = (seed, names.points_of.contains_key(name)) {
                sink.error(
                    reference.span(),
                    slot_key,
                    format!(
                        "`{name}` is swept over `seed` but has no point with seed = {seed}, the seed of this point \
                         (a step swept over `seed` reads its own seed's point of a seed-swept input)"
                    ),
                );
                continue;
            }
            if names.points_of.contains_key(name) || step == name {
                continue; // the step exists but failed to parse: already reported
            }
            sink.error(
                reference.span(),
                slot_key,
                format!(
                    "unknown reference `{name}`{}: not a model, dataset or step",
                    hint(name, names.all())
                ),
            );
            continue;
        }
        for (input, artifact) in found {
            if let Some(spec) = spec {
                if !spec.accepts.contains(&artifact) {
                    sink.error(
                        reference.span(),
                        slot_key,
                        format!(
                            "`{name}` is a {artifact}, but input `{}` takes {}",
                            spec.name,
                            accepted(&spec)
                        ),
                    );
                }
            }
            resolved.push(input);
        }
    }
    if let Some(spec) = spec {
        if !spec.many && resolved.len() > 1 {
            sink.error(
                slot_span,
                slot_key,
                format!(
                    "input `{}` takes one artifact but got {} ({}); name a single sweep point, or sweep over `inputs.{}`",
                    spec.name,
                    resolved.len(),
                    resolved.iter().map(InputRef::display_name).collect::<Vec<_>>().join(", "),
                    spec.name
                ),
            );
        }
    }
    resolved
}

fn resolve_part(
    step: &str,
    part: &str,
    points_of: &IndexMap<String, Vec<String>>,
    parts_of: &HashMap<String, Vec<ArtifactPart>>,
) -> Result<Vec<(InputRef, ArtifactKind)>, String> {
    let points = match points_of.get(step) {
        Some(points) => points.clone(),
        None if parts_of.contains_key(step) => vec![step.to_string()],
        None => return Ok(Vec::new()),
    };
    let mut found = Vec::with_capacity(points.len());
    for point in points {
        let parts = parts_of.get(&point).map(Vec::as_slice).unwrap_or_default();
        match parts.iter().find(|p| p.name == part) {
            Some(p) => found.push((InputRef::Part(point, part.to_string()), p.kind)),
            None if parts.is_empty() => {
                return Err(format!(
                    "step `{point}` has no parts to reference as `{point}/...`"
                ))
            }
            None => {
                let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
                return Err(format!(
                    "step `{point}` has no part `{part}`{}; its parts: {}",
                    hint(part, names.iter().copied()),
                    names.join(", ")
                ));
            }
        }
    }
    Ok(found)
}

fn expect_table<'b, 'i>(
    value: &'b Value<'i>,
    key: &str,
    sink: &mut DiagnosticSink,
) -> Option<&'b DeTable<'i>> {
    match value.get_ref() {
        DeValue::Table(t) => Some(t),
        _ => {
            sink.error(value.span(), key, "expected a table");
            None
        }
    }
}

/// Names of models, datasets, plugins and steps: letters, digits, `_` and `-`.
fn check_name(name: &Key<'_>, key: &str, sink: &mut DiagnosticSink) -> bool {
    let ok = !name.get_ref().is_empty()
        && name
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !ok {
        sink.error(
            name.span(),
            key,
            "names may contain only letters, digits, `_` and `-`",
        );
    }
    ok
}

/// Fills keys missing from `params` with the kind's defaults (tables merged key by key).
fn merge_defaults<'i>(params: &mut DeTable<'i>, defaults: &DeTable<'i>) {
    for (k, v) in defaults.iter() {
        let existing = params.get_mut(k.get_ref().as_ref());
        match existing {
            None => {
                params.insert(k.clone(), v.clone());
            }
            Some(current) => {
                if let (DeValue::Table(cur), DeValue::Table(def)) = (current.get_mut(), v.get_ref())
                {
                    merge_defaults(cur, def);
                }
            }
        }
    }
}

/// Sets the dotted parameter path `key` to `value`, creating tables on the way.
fn set_path<'i>(params: &mut DeTable<'i>, key: &Key<'i>, value: Value<'i>) {
    let parts: Vec<&str> = key.get_ref().split('.').collect();
    let mut table = params;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(Spanned::new(key.span(), Cow::Owned(part.to_string())))
            .or_insert_with(|| Spanned::new(key.span(), DeValue::Table(DeTable::new())));
        if !matches!(entry.get_ref(), DeValue::Table(_)) {
            *entry = Spanned::new(key.span(), DeValue::Table(DeTable::new()));
        }
        let DeValue::Table(t) = entry.get_mut() else {
            unreachable!()
        };
        table = t;
    }
    table.insert(
        Spanned::new(key.span(), Cow::Owned(parts[parts.len() - 1].to_string())),
        value,
    );
}

/// What kind of special file `path` is (following symbolic links), or `None` for a regular file, a
/// folder, or a path that does not exist.
fn special_file_kind(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path).ok()?.file_type();
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_fifo() {
        Some("FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("character device")
    } else if t.is_block_device() {
        Some("block device")
    } else if t.is_socket() {
        Some("socket")
    } else {
        Some("special file")
    }
}

/// The cartesian product of the axes' indices, first axis outermost; one empty point without axes.
fn grid(axes: &[(Key<'_>, Vec<Value<'_>>)]) -> Vec<Vec<usize>> {
    let mut points = vec![Vec::new()];
    for (_, values) in axes {
        points = points
            .into_iter()
            .flat_map(|p| (0..values.len()).map(move |i| [p.clone(), vec![i]].concat()))
            .collect();
    }
    points
}

fn label_key(axis: &str) -> String {
    axis.strip_prefix("inputs.").unwrap_or(axis).to_string()
}

/// Span of a key path (`a.b[2].c`) inside a table.
fn lookup(table: &DeTable<'_>, path: &str) -> Option<Range<usize>> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        segments.push((name.to_string(), None));
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            segments.push((
                String::new(),
                idx.trim_end_matches(']').parse::<usize>().ok(),
            ));
        }
    }
    let mut current: Option<&Value<'_>> = None;
    for (name, index) in segments {
        current = match (current.map(Spanned::get_ref), index) {
            (None, None) => table.get(name.as_str()),
            (Some(DeValue::Table(t)), None) => t.get(name.as_str()),
            (Some(DeValue::Array(a)), Some(i)) => a.get(i),
            _ => return current.map(Spanned::span),
        };
        current?;
    }
    current.map(Spanned::span)
}

fn join_key(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => path.to_string(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

/// serde_path_to_error writes `?` for unknown segments; drop them.
fn clean_path(path: &str) -> String {
    path.split('.')
        .filter(|p| *p != "?")
        .collect::<Vec<_>>()
        .join(".")
}

fn serde_message(e: &toml::de::Error) -> String {
    e.message().trim().to_string()
}

/// Span of the `[steps.NAME]` header (or the `NAME` key), for errors about a whole step.
fn step_span(source: &str, base: &str) -> Range<usize> {
    let header = format!("[steps.{base}]");
    source.find(&header).map_or(0..0, |i| i..i + header.len())
}
