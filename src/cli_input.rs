//! What `authkeeper connect` asks the user for: the fields of the chosen flow, from
//! `--field NAME=VALUE`, a JSON object on standard input (`--stdin`), or prompts — secrets with
//! no echo. A secret is never taken from the command line, where `ps` and shell history keep it.

use crate::client::{Client, ClientError};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::io::{BufRead, IsTerminal, Write};

#[derive(Deserialize)]
struct FlowInfo {
    flow: String,
    fields: Vec<String>,
    #[serde(default)]
    secret_fields: Vec<String>,
}

#[derive(Deserialize)]
struct ProviderInfo {
    name: String,
    flows: Vec<FlowInfo>,
}

fn usage(message: String) -> ClientError {
    ClientError::Usage(message)
}

/// The body of `POST …/connect` for `provider`'s `flow` (its first flow when `None`).
pub async fn connect_body(
    client: &Client,
    provider: &str,
    flow: Option<String>,
    given: &[String],
    stdin: bool,
) -> Result<Value, ClientError> {
    let providers: Vec<ProviderInfo> = client.get("/v1/providers").await?;
    // An unknown provider or flow is the daemon's to refuse, with its own message.
    let Some(info) = providers.into_iter().find(|p| p.name == provider) else {
        return Ok(json!({ "flow": flow }));
    };
    let Some(chosen) = info.flows.into_iter().find(|f| flow.as_ref().is_none_or(|name| &f.flow == name)) else {
        return Ok(json!({ "flow": flow }));
    };
    let mut fields = Map::new();
    if stdin {
        let mut text = String::new();
        std::io::stdin().lock().read_line(&mut text).map_err(|e| usage(format!("cannot read standard input: {e}")))?;
        let Value::Object(read) = serde_json::from_str(text.trim())
            .map_err(|e| usage(format!("--stdin takes one JSON object on one line: {e}")))?
        else {
            return Err(usage("--stdin takes one JSON object, e.g. {\"username\": \"…\", \"password\": \"…\"}".into()));
        };
        fields = read;
    }
    for pair in given {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(usage(format!("--field takes NAME=VALUE, not {pair:?}")));
        };
        if chosen.secret_fields.iter().any(|s| s == name) {
            return Err(usage(format!(
                "{name} is a secret: it is prompted for with no echo, or read with --stdin, never taken from the command line"
            )));
        }
        fields.insert(name.to_owned(), value.into());
    }
    for name in &chosen.fields {
        if fields.contains_key(name) {
            continue;
        }
        let secret = chosen.secret_fields.contains(name);
        if stdin || !std::io::stdin().is_terminal() {
            return Err(usage(format!(
                "the {} flow needs {name}: give it with {}",
                chosen.flow,
                if secret { "--stdin".to_owned() } else { format!("--field {name}=…") }
            )));
        }
        let value = if secret {
            rpassword::prompt_password(format!("{provider} {name}: "))
                .map_err(|e| usage(format!("cannot read {name}: {e}")))?
        } else {
            eprint!("{provider} {name}: ");
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map_err(|e| usage(format!("cannot read {name}: {e}")))?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        };
        fields.insert(name.clone(), value.into());
    }
    fields.insert("flow".into(), chosen.flow.into());
    Ok(Value::Object(fields))
}
