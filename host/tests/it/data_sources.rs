//! Dataset reading: JSONL and Parquet, malformed lines, formats and field mappings, filters, caps, mixtures.

use dusflow::data::{
    load_dataset, load_mixture, DatasetSource, Example, FieldMap, FnFilter, RecordFilter,
    RecordFormat, Verdict,
};
use dusflow::workflow::OnError;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name)
}

fn source(files: Vec<PathBuf>, format: Option<RecordFormat>) -> DatasetSource {
    DatasetSource {
        name: "d".into(),
        files,
        format,
        fields: FieldMap::default(),
        max_samples: None,
        filters: vec![],
        on_error: OnError::Fail,
    }
}

fn no_filters(name: &str) -> anyhow::Result<Box<dyn RecordFilter>> {
    anyhow::bail!("no filter {name}")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn malformed_line_names_file_and_line_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.jsonl",
        "{\"text\": \"one\"}\n\n{\"text\": \"two\"\n{\"text\": \"three\"}\n[1]\n",
    );
    let err = load_dataset(&source(vec![f.clone()], None), &mut no_filters, 0).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("{}:3", f.display())) && msg.contains("not valid JSON"),
        "{msg}"
    );

    let mut s = source(vec![f.clone()], None);
    s.on_error = OnError::Skip;
    let loaded = load_dataset(&s, &mut no_filters, 0).unwrap();
    assert_eq!(
        loaded.examples,
        vec![Example::Text("one".into()), Example::Text("three".into())]
    );
    assert_eq!(loaded.report.skipped_malformed, 2);
    let first = loaded.report.first_skipped.as_deref().unwrap();
    assert!(
        first.starts_with(&format!("{}:3: not valid JSON", f.display())),
        "{first}"
    );

    // A well-formed JSON line that lacks the layout's fields is also malformed, with its line.
    let g = write(
        dir.path(),
        "b.jsonl",
        "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}\n",
    );
    let err = load_dataset(
        &source(vec![g.clone()], Some(RecordFormat::Alpaca)),
        &mut no_filters,
        0,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("{}:2", g.display())) && msg.contains("missing field \"output\""),
        "{msg}"
    );
}

#[test]
fn parquet_written_by_pyarrow_is_read_as_records() {
    let loaded = load_dataset(
        &source(vec![fixture("alpaca.parquet")], None),
        &mut no_filters,
        0,
    )
    .unwrap();
    assert_eq!(loaded.format, RecordFormat::Alpaca);
    assert_eq!(
        loaded.examples[0],
        Example::Alpaca {
            instruction: "Add the numbers.".into(),
            input: "2 and 3".into(),
            output: "5".into()
        }
    );
    assert_eq!(loaded.examples.len(), 3);
}

#[test]
fn field_mapping_and_gsm8k_layout() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "q.jsonl",
        "{\"q\": \"What is 2+2?\", \"a\": \"4\"}\n",
    );
    let mut s = source(vec![f], Some(RecordFormat::PromptCompletion));
    s.fields = FieldMap(
        [
            ("prompt".into(), "q".into()),
            ("completion".into(), "a".into()),
        ]
        .into_iter()
        .collect(),
    );
    let loaded = load_dataset(&s, &mut no_filters, 0).unwrap();
    assert_eq!(
        loaded.examples,
        vec![Example::PromptCompletion {
            prompt: "What is 2+2?".into(),
            completion: "4".into()
        }]
    );

    let g = write(
        dir.path(),
        "g.jsonl",
        "{\"question\": \"2+2?\", \"answer\": \"2+2=4\\n#### 4\"}\n",
    );
    let loaded = load_dataset(&source(vec![g], None), &mut no_filters, 0).unwrap();
    assert_eq!(loaded.format, RecordFormat::Gsm8k);
    assert_eq!(
        loaded.examples[0],
        Example::PromptCompletion {
            prompt: "Question: 2+2?\nAnswer:".into(),
            completion: " 2+2=4\n#### 4".into()
        }
    );
}

#[test]
fn filters_keep_drop_rewrite_in_batches_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let body: String = (0..2500)
        .map(|i| format!("{{\"text\": \"doc {i}\"}}\n"))
        .collect();
    let f = write(dir.path(), "t.jsonl", &body);
    let mut s = source(vec![f], Some(RecordFormat::Text));
    s.filters = vec!["drop-odd".into(), "shout".into()];
    let batch_sizes = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let loaded = {
        let sizes = batch_sizes.clone();
        let mut make = |name: &str| -> anyhow::Result<Box<dyn RecordFilter>> {
            Ok(match name {
                "drop-odd" => {
                    let sizes = sizes.clone();
                    Box::new(FnFilter::new("drop-odd", move |recs: &[String]| {
                        sizes.borrow_mut().push(recs.len());
                        Ok(recs
                            .iter()
                            .map(|r| {
                                let v: serde_json::Value = serde_json::from_str(r).unwrap();
                                let n: usize = v["text"].as_str().unwrap()[4..].parse().unwrap();
                                if n % 2 == 1 {
                                    Verdict::Drop
                                } else {
                                    Verdict::Keep
                                }
                            })
                            .collect())
                    }))
                }
                _ => Box::new(FnFilter::new("shout", |recs: &[String]| {
                    Ok(recs
                        .iter()
                        .map(|r| {
                            if r.contains("doc 0\"") {
                                Verdict::Rewrite(r.to_uppercase().replace("TEXT", "text"))
                            } else {
                                Verdict::Keep
                            }
                        })
                        .collect())
                })),
            })
        };
        load_dataset(&s, &mut make, 0).unwrap()
    };
    assert_eq!(*batch_sizes.borrow(), vec![1000, 1000, 500]);
    let r = &loaded.report;
    assert_eq!(
        (r.filters[0].seen, r.filters[0].kept, r.filters[0].dropped),
        (2500, 1250, 1250)
    );
    assert_eq!(
        (r.filters[1].seen, r.filters[1].kept, r.filters[1].rewritten),
        (1250, 1250, 1)
    );
    assert_eq!(loaded.examples[0], Example::Text("DOC 0".into()));
    assert_eq!(r.used, 1250);

    let mut bad = |_: &str| -> anyhow::Result<Box<dyn RecordFilter>> {
        Ok(Box::new(FnFilter::new("broken", |recs: &[String]| {
            Ok(vec![Verdict::Rewrite("[1]".into()); recs.len()])
        })))
    };
    s.filters = vec!["broken".into()];
    let msg = format!("{:#}", load_dataset(&s, &mut bad, 0).unwrap_err());
    assert!(
        msg.contains("filter \"broken\" rewrote") && msg.contains("t.jsonl:1"),
        "{msg}"
    );
}

#[test]
fn caps_and_mixtures_are_seeded_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a: String = (0..100)
        .map(|i| format!("{{\"prompt\": \"a{i}\", \"completion\": \"x\"}}\n"))
        .collect();
    let b: String = (0..10)
        .map(|i| format!("{{\"instruction\": \"b{i}\", \"output\": \"y\"}}\n"))
        .collect();
    let mut sa = source(vec![write(dir.path(), "a.jsonl", &a)], None);
    sa.name = "a".into();
    sa.max_samples = Some(20);
    let mut sb = source(vec![write(dir.path(), "b.jsonl", &b)], None);
    sb.name = "b".into();
    let formats = [RecordFormat::PromptCompletion, RecordFormat::Alpaca];
    let m1 = load_mixture(&[sa.clone(), sb.clone()], &mut no_filters, 7, &formats).unwrap();
    let m2 = load_mixture(&[sa.clone(), sb.clone()], &mut no_filters, 7, &formats).unwrap();
    let m3 = load_mixture(&[sa.clone(), sb.clone()], &mut no_filters, 8, &formats).unwrap();
    assert_eq!(m1.examples.len(), 30);
    assert_eq!(m1.examples, m2.examples);
    assert_ne!(m1.examples, m3.examples);
    assert_eq!((m1.reports[0].available, m1.reports[0].used), (100, 20));
    let err = load_mixture(&[sa, sb], &mut no_filters, 7, &[RecordFormat::Text]).unwrap_err();
    assert!(
        err.to_string()
            .contains("dataset \"a\" has format prompt-completion"),
        "{err}"
    );
}

#[test]
fn a_rewrite_of_the_wrong_shape_names_the_filter_and_the_record_even_when_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.jsonl",
        "{\"instruction\": \"i\", \"output\": \"o\"}\n{\"instruction\": \"j\", \"output\": \"p\"}\n",
    );
    let mut s = source(vec![f.clone()], Some(RecordFormat::Alpaca));
    s.filters = vec!["numbers".into()];
    // `on_error = "skip"` is about malformed input lines; a plugin's wrong answer is never skipped.
    s.on_error = OnError::Skip;
    let mut make = |_: &str| -> anyhow::Result<Box<dyn RecordFilter>> {
        Ok(Box::new(FnFilter::new("numbers", |recs: &[String]| {
            Ok(recs
                .iter()
                .enumerate()
                .map(|(i, r)| match i {
                    1 => Verdict::Rewrite(r.replace("\"p\"", "5")),
                    _ => Verdict::Keep,
                })
                .collect())
        })))
    };
    let err = format!("{:#}", load_dataset(&s, &mut make, 0).unwrap_err());
    assert!(err.contains(&format!("{}:2", f.display())), "{err}");
    assert!(
        err.contains("filter plugin \"numbers\" rewrote this record into one that is not a valid alpaca record"),
        "{err}"
    );
    assert!(!err.contains("malformed"), "{err}");

    let empty = write(dir.path(), "empty.jsonl", "");
    let err = format!(
        "{:#}",
        load_dataset(&source(vec![empty.clone()], None), &mut no_filters, 0).unwrap_err()
    );
    assert!(
        err.contains(&format!("{}: the dataset file is empty", empty.display())),
        "{err}"
    );
}
