//! Chat templates: a model's own Jinja `chat_template`, rendered as transformers' `apply_chat_template`
//! renders it, and two built-ins (ChatML; the Alpaca-styled chat template of SOLAR-10.7B-Instruct).
//!
//! transformers compiles templates in an immutable sandboxed Jinja environment with `trim_blocks` and
//! `lstrip_blocks` on (and Jinja's default of dropping one trailing newline), the loop-controls extension
//! (`break`, `continue`), a `tojson` filter that is Python's `json.dumps` (non-ASCII kept; `indent`,
//! `separators`, `sort_keys`, `ensure_ascii` as keywords), and the globals `raise_exception(message)` and
//! `strftime_now(format)`; it renders with `messages`, `tools = None`, `documents = None`,
//! `add_generation_prompt`, and the tokenizer's special tokens (`bos_token`, `eos_token`, …) as strings.
//! [`ChatTemplate`] sets up minijinja the same way, with Python's string methods (`.strip()`, `.split()`,
//! `.startswith()`, …) from minijinja-contrib's `pycompat`. A `{% generation %}` block (transformers'
//! assistant-mask marker) renders its body unchanged.
//!
//! Which text the model learns is found by rendering incrementally: for each assistant message `i`, the
//! conversation before it with the generation prompt (`P_i`) and the conversation up to and including it
//! (`Q_i`) — the assistant's turn is `Q_i` without its prefix `P_i` (its content and the end-of-turn text the
//! template writes after it), and `Q_i` must be a prefix of the whole rendering. A template that renders
//! earlier turns differently once later turns follow is refused with an error rather than guessed at.
//! Preference pairs follow TRL's `maybe_apply_chat_template`: prompt = the context with the generation
//! prompt, each completion = the rendering of context + reply after the longest common prefix.

use super::format::Message;
use anyhow::{anyhow, bail, Result};
use dusflow_model::ModelChatTemplate;
use minijinja::value::{Kwargs, Value as JinjaValue, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::{Map, Value};
use std::fmt::Write;
use std::ops::Range;

/// ChatML, as the OpenHermes / Qwen family writes it (no BOS, `<|im_end|>` closes every turn).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The Alpaca-styled chat template the SOLAR paper reformatted its instruction data with, as
/// upstage/SOLAR-10.7B-Instruct-v1.0 ships it in its `tokenizer_config.json`:
/// `### System:\n…\n\n### User:\n…\n\n### Assistant:\n…`.
pub const ALPACA_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{% if message['content']%}{{'### System:\\n' + message['content']+'\\n\\n'}}{% endif %}{% elif message['role'] == 'user' %}{{'### User:\\n' + message['content']+'\\n\\n'}}{% elif message['role'] == 'assistant' %}{{'### Assistant:\\n'  + message['content']}}{% endif %}{% if loop.last and add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}{% endfor %}";

/// A compiled chat template with the variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// What it is, for messages and reports: `chatml (built-in)`, or the model file it came from.
    pub name: String,
    vars: Map<String, Value>,
    /// Whether the template writes the tokenizer's special tokens itself (a model's template: the text is
    /// tokenised without adding any, and nothing is appended) rather than being a built-in (the tokenizer's
    /// BOS goes first and EOS last, as for the Alpaca prompt).
    pub writes_specials: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("writes_specials", &self.writes_specials)
            .finish()
    }
}

/// A rendered conversation: its text and the byte ranges of it the loss covers (the assistant turns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    /// The text.
    pub text: String,
    /// Learned byte ranges, ascending and disjoint.
    pub learned: Vec<Range<usize>>,
    /// See [`ChatTemplate::writes_specials`].
    pub writes_specials: bool,
}

/// A preference pair as text: prompt and the two completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceText {
    /// The prompt.
    pub prompt: String,
    /// The preferred completion.
    pub chosen: String,
    /// The dispreferred completion.
    pub rejected: String,
    /// Tokenise with the tokenizer's own specials (BOS): false when a model's template wrote them.
    pub add_special_tokens: bool,
}

impl ChatTemplate {
    /// Compiles `source` as transformers does; `special_tokens` are the variables `bos_token`,
    /// `eos_token`, … (strings) and `name` says where the template came from.
    pub fn new(
        source: &str,
        special_tokens: Map<String, Value>,
        name: impl Into<String>,
        writes_specials: bool,
    ) -> Result<Self> {
        let name = name.into();
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| anyhow!("{e}"))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", without_generation_tags(source))
            .map_err(|e| anyhow!("chat template ({name}) does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            name,
            vars: special_tokens,
            writes_specials,
        })
    }

    /// A model folder's template (see [`dusflow_model::read_chat_template`]).
    pub fn from_model(t: &ModelChatTemplate) -> Result<Self> {
        Self::new(&t.source, t.special_tokens.clone(), &t.origin, true)
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE, Map::new(), "chatml (built-in)", false)
            .expect("the built-in ChatML template compiles")
    }

    /// The built-in Alpaca-styled chat template (SOLAR-10.7B-Instruct's).
    pub fn alpaca_chat() -> Self {
        Self::new(ALPACA_CHAT_TEMPLATE, Map::new(), "alpaca (built-in)", false)
            .expect("the built-in Alpaca chat template compiles")
    }

    /// Sets extra template variables (transformers' `apply_chat_template(**kwargs)`, e.g. a fixed
    /// `date_string` for templates that would otherwise read today's date).
    pub fn with_kwargs(mut self, kwargs: &Map<String, Value>) -> Self {
        for (k, v) in kwargs {
            self.vars.insert(k.clone(), v.clone());
        }
        self
    }

    /// The template's text for `messages`, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)` returns it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.vars.clone();
        ctx.insert("messages".into(), serde_json::to_value(messages)?);
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template("chat_template")
            .expect("the template was added");
        template
            .render(JinjaValue::from(minijinja::value::Serde(Value::Object(
                ctx,
            ))))
            .map_err(|e| {
                let detail = e.detail().unwrap_or_default().to_string();
                if e.kind() == ErrorKind::InvalidOperation && !detail.is_empty() {
                    anyhow!(
                        "chat template ({}) refused the conversation: {detail}",
                        self.name
                    )
                } else {
                    anyhow!("chat template ({}) failed: {e:#}", self.name)
                }
            })
    }

    /// The whole conversation and the text of its assistant turns (see the module docs).
    pub fn conversation(&self, messages: &[Message]) -> Result<RenderedChat> {
        let text = self.render(messages, false)?;
        let mut learned = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) {
                bail!(
                    "chat template ({}) is not incremental: the conversation up to assistant message {i} \
                     does not start with the conversation before it plus the generation prompt, so the \
                     assistant's text cannot be told apart (use template = \"chatml\" or \"alpaca\")",
                    self.name
                );
            }
            if !text.starts_with(&through) {
                bail!(
                    "chat template ({}) renders message {i} differently once later messages follow, so \
                     the assistant's text cannot be told apart (use template = \"chatml\" or \"alpaca\", \
                     or one conversation turn per record)",
                    self.name
                );
            }
            if through.len() > before.len() {
                learned.push(before.len()..through.len());
            }
        }
        Ok(RenderedChat {
            text,
            learned,
            writes_specials: self.writes_specials,
        })
    }

    /// A preference pair from a shared context and two assistant replies, as TRL's
    /// `maybe_apply_chat_template` forms it.
    pub fn preference(
        &self,
        context: &[Message],
        chosen: &str,
        rejected: &str,
    ) -> Result<PreferenceText> {
        let with = |reply: &str| -> Result<String> {
            let mut all = context.to_vec();
            all.push(Message {
                role: "assistant".into(),
                content: reply.to_string(),
            });
            self.render(&all, false)
        };
        let mut prompt = self.render(context, true)?;
        let prompt_chosen = with(chosen)?;
        prompt.truncate(common_prefix(&prompt, &prompt_chosen));
        let chosen = prompt_chosen[prompt.len()..].to_string();
        let prompt_rejected = with(rejected)?;
        prompt.truncate(common_prefix(&prompt, &prompt_rejected));
        let rejected = prompt_rejected[prompt.len()..].to_string();
        Ok(PreferenceText {
            prompt,
            chosen,
            rejected,
            add_special_tokens: !self.writes_specials,
        })
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

/// `{% generation %}` … `{% endgeneration %}` (transformers' marker of assistant text) as a block that
/// renders its body unchanged, keeping the tags' whitespace control.
fn without_generation_tags(source: &str) -> String {
    let re = regex::Regex::new(r"\{%(-?)(\s*)(end)?generation(\s*)(-?)%\}").expect("valid regex");
    re.replace_all(source, |c: &regex::Captures<'_>| {
        let tag = if c.get(3).is_some() {
            "endif"
        } else {
            "if true"
        };
        format!("{{%{}{}{}{}{}%}}", &c[1], &c[2], tag, &c[4], &c[5])
    })
    .into_owned()
}

/// Prints values as Jinja2 does under Python: `True`, `False`, `None` (minijinja writes them lowercase).
fn python_formatter(
    out: &mut minijinja::Output<'_>,
    state: &mut minijinja::State<'_, '_>,
    value: &JinjaValue,
) -> Result<(), JinjaError> {
    let word = match value.kind() {
        ValueKind::Bool if value.is_true() => "True",
        ValueKind::Bool => "False",
        ValueKind::None => "None",
        _ => return minijinja::escape_formatter(out, state, value),
    };
    out.write_str(word).map_err(JinjaError::from)
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(format)` (local time).
fn strftime_now(format: String) -> Result<String, JinjaError> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.into_iter())
    )
    .map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(out)
}

/// The `tojson` filter transformers installs: `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each overridable by keyword (and `indent` also positionally).
fn tojson(
    value: JinjaValue,
    indent: Option<JinjaValue>,
    kwargs: Kwargs,
) -> Result<String, JinjaError> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<JinjaValue>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        Some(v) => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = match kwargs.get::<Option<JinjaValue>>("separators")? {
        Some(v) if !v.is_none() => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().unwrap_or_default().to_string())
                .collect();
            let [item, key] = <[String; 2]>::try_from(parts).map_err(|_| {
                JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                )
            })?;
            (item, key)
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    kwargs.assert_all_used()?;
    let dumper = JsonDumper {
        indent,
        item_separator: separators.0,
        key_separator: separators.1,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    dumper.value(&value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps` over template values.
struct JsonDumper {
    indent: Option<String>,
    item_separator: String,
    key_separator: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl JsonDumper {
    fn value(&self, v: &JinjaValue, depth: usize, out: &mut String) -> Result<(), JinjaError> {
        match v.kind() {
            ValueKind::Undefined => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type Undefined is not JSON serializable",
                ))
            }
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                    out.push_str(&python_float(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<JinjaValue> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (n, k) in keys.iter().enumerate() {
                    if n > 0 {
                        out.push_str(&self.item_separator);
                    }
                    self.newline(depth + 1, out);
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    self.string(&key, out);
                    out.push_str(&self.key_separator);
                    self.value(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<JinjaValue> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push_str(&self.item_separator);
                    }
                    self.newline(depth + 1, out);
                    self.value(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of kind {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits, exponent form below 1e-4
/// and from 1e16 with a signed two-digit exponent, `NaN` / `Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let debug = format!("{f:?}");
    match debug.split_once('e') {
        None => debug,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn template(source: &str) -> ChatTemplate {
        let specials = json!({"bos_token": "<s>", "eos_token": "</s>"});
        ChatTemplate::new(source, specials.as_object().unwrap().clone(), "test", true).unwrap()
    }

    #[test]
    fn chatml_spans_cover_each_assistant_turn_and_its_end_marker() {
        let t = ChatTemplate::chatml();
        let chat = t
            .conversation(&[
                m("system", "Be brief."),
                m("user", "2+2?"),
                m("assistant", "4"),
                m("user", "and 3+3?"),
                m("assistant", "6"),
            ])
            .unwrap();
        let learned: Vec<&str> = chat.learned.iter().map(|r| &chat.text[r.clone()]).collect();
        assert_eq!(learned, ["4<|im_end|>\n", "6<|im_end|>\n"]);
        assert!(chat
            .text
            .starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
        assert!(!chat.writes_specials);
    }

    #[test]
    fn trim_blocks_loop_controls_namespace_and_python_methods_behave_as_in_jinja2() {
        let t = template(
            "{% set ns = namespace(n=0) %}\n{% for x in messages %}\n  {% if x.role == 'system' %}{% continue %}{% endif %}\n{{ x.content.strip() | upper }}{% set ns.n = ns.n + 1 %}\n{% if ns.n == 2 %}{% break %}{% endif %}\n{% endfor %}\n{{ ns.n }}\n",
        );
        let out = t
            .render(
                &[
                    m("system", "s"),
                    m("user", " a "),
                    m("assistant", "b"),
                    m("user", "c"),
                ],
                false,
            )
            .unwrap();
        // What transformers' own environment renders (checked with transformers 4.57.1).
        assert_eq!(out, "AB2");
    }

    #[test]
    fn booleans_and_none_print_as_python_prints_them() {
        let t = template("{{ messages[0].content.startswith('a') }} {{ 1 == 2 }} {{ none }}");
        assert_eq!(
            t.render(&[m("user", "abc")], false).unwrap(),
            "True False None"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error_with_its_message() {
        let t = template("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok");
        let err = t
            .render(&[m("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("System role not supported") && err.contains("test"),
            "{err}"
        );
        assert_eq!(t.render(&[m("user", "x")], false).unwrap(), "ok");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = template(
            "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ 'é\"\\n' | tojson }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': [1.5, 1e20, none, true]} | tojson(sort_keys=true, separators=[',', ':']) }}",
        );
        let out = t.render(&[m("user", "hi")], false).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"hi\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"hi\"\n  }\n]|\"é\\\"\\n\"|\"\\u00e9\"|{\"a\":[1.5,1e+20,null,true],\"b\":1}"
        );
    }

    #[test]
    fn strftime_now_formats_the_local_date() {
        let t = template("{{ strftime_now('%Y-%m-%d') }}");
        let today = chrono::Local::now().format("%Y-%m-%d").to_string();
        assert_eq!(t.render(&[], false).unwrap(), today);
    }

    #[test]
    fn generation_blocks_render_their_body() {
        let t = template("{% for x in messages %}{%- generation -%}  {{ x.content }}{% endgeneration %}{% endfor %}");
        assert_eq!(t.render(&[m("assistant", "a")], false).unwrap(), "a");
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused() {
        // The last assistant turn gets a marker earlier turns lose: not incremental.
        let t = template("{% for x in messages %}{{ x.content }}{% if loop.last and x.role == 'assistant' %}!{% endif %}|{% endfor %}");
        let err = t
            .conversation(&[
                m("user", "q"),
                m("assistant", "a"),
                m("user", "q2"),
                m("assistant", "b"),
            ])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("differently once later messages follow"),
            "{err}"
        );
    }

    #[test]
    fn preference_pairs_split_at_the_common_prefix_like_trl() {
        let t = template("{{ bos_token }}{% for x in messages %}[{{ x.role }}]{{ x.content }}{% if x.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}");
        let p = t.preference(&[m("user", "q")], "yes", "no").unwrap();
        assert_eq!(
            (p.prompt.as_str(), p.chosen.as_str(), p.rejected.as_str()),
            ("<s>[user]q[assistant]", "yes</s>", "no</s>")
        );
        assert!(!p.add_special_tokens);
        let alpaca = ChatTemplate::alpaca_chat()
            .preference(&[m("system", "S"), m("user", "Q")], "A", "B")
            .unwrap();
        assert_eq!(
            alpaca.prompt,
            "### System:\nS\n\n### User:\nQ\n\n### Assistant:\n"
        );
        assert_eq!(
            (alpaca.chosen.as_str(), alpaca.rejected.as_str()),
            ("A", "B")
        );
        assert!(alpaca.add_special_tokens);
    }

    #[test]
    fn floats_print_as_python_repr() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e-5), "1e-05");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e300), "1.5e+300");
        assert_eq!(python_float(123456789012345.0), "123456789012345.0");
    }
}
