//! `arcadectl enroll …`: enrolment tokens that grant labels (create, list, revoke).

use std::collections::BTreeMap;

use arcade_proto::v1 as pb;
use serde::Serialize;

use super::error::CtlError;
use super::output::{emit, emit_json, labels_text, table, time};
use super::{Ctx, EnrollCommand, parse_labels};

/// One enrolment token as `--json` prints it (never the secret, except at creation).
#[derive(Debug, Clone, Serialize)]
pub struct EnrollTokenJson {
    /// Short id (for revoke).
    pub id: String,
    /// Labels it grants.
    pub labels: BTreeMap<String, String>,
    /// Agent ids it enrols (`*` wildcard; empty = any).
    pub id_pattern: String,
    /// Unix ms (0 = never).
    pub expires_at: i64,
    /// New agents it may enrol (0 = unlimited).
    pub max_uses: u32,
    /// New agents it enrolled.
    pub uses: u32,
    /// The admin's note.
    pub note: String,
    /// Unix ms.
    pub created_at: i64,
}

impl From<pb::EnrollTokenInfo> for EnrollTokenJson {
    fn from(i: pb::EnrollTokenInfo) -> Self {
        Self {
            id: i.id,
            labels: i.labels.into_iter().map(|l| (l.key, l.value)).collect(),
            id_pattern: i.id_pattern,
            expires_at: i.expires_at,
            max_uses: i.max_uses,
            uses: i.uses,
            note: i.note,
            created_at: i.created_at,
        }
    }
}

/// What `enroll create --json` prints.
#[derive(Debug, Serialize)]
struct CreatedJson {
    token: String,
    #[serde(flatten)]
    info: EnrollTokenJson,
}

pub(crate) async fn run(ctx: &Ctx, command: EnrollCommand) -> Result<(), CtlError> {
    let conn = ctx.connect().await?;
    match command {
        EnrollCommand::Create {
            label,
            id_pattern,
            expires,
            uses,
            note,
            json,
        } => {
            let labels = parse_labels(&label, "--label")?;
            let resp = conn
                .fleet()
                .create_enroll_token(pb::CreateEnrollTokenRequest {
                    labels: arcade_p2p::labels::to_proto(&labels),
                    id_pattern,
                    expires_in_seconds: expires.map_or(0, |d| d.0.as_secs().max(1)),
                    max_uses: uses,
                    note,
                })
                .await
                .map_err(|s| conn.error(s))?
                .into_inner();
            let info = EnrollTokenJson::from(resp.info.unwrap_or_default());
            if json {
                emit_json(&CreatedJson {
                    token: resp.token,
                    info,
                })
            } else {
                // The secret alone on stdout (for `> file`); what it grants on stderr.
                eprintln!(
                    "enrolment token {} created: grants {}; shown once, keep it secret",
                    info.id,
                    labels_text(&info.labels)
                );
                emit(&resp.token)
            }
        }
        EnrollCommand::List { json } => {
            let tokens: Vec<EnrollTokenJson> = conn
                .fleet()
                .list_enroll_tokens(pb::ListEnrollTokensRequest {})
                .await
                .map_err(|s| conn.error(s))?
                .into_inner()
                .tokens
                .into_iter()
                .map(EnrollTokenJson::from)
                .collect();
            if json {
                emit_json(&tokens)
            } else if tokens.is_empty() {
                emit("no enrolment tokens (besides the fleet-wide one)")
            } else {
                emit(&token_table(&tokens))
            }
        }
        EnrollCommand::Revoke { id } => {
            conn.fleet()
                .revoke_enroll_token(pb::RevokeEnrollTokenRequest { id: id.clone() })
                .await
                .map_err(|s| conn.error(s))?;
            emit(&format!(
                "enrolment token {id} revoked (agents it enrolled keep their own tokens)"
            ))
        }
    }
}

fn token_table(tokens: &[EnrollTokenJson]) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                labels_text(&t.labels),
                if t.id_pattern.is_empty() {
                    "*".into()
                } else {
                    t.id_pattern.clone()
                },
                if t.expires_at == 0 {
                    "never".into()
                } else {
                    time(t.expires_at)
                },
                if t.max_uses == 0 {
                    format!("{}/unlimited", t.uses)
                } else {
                    format!("{}/{}", t.uses, t.max_uses)
                },
                t.note.clone(),
            ]
        })
        .collect();
    table(&["ID", "LABELS", "IDS", "EXPIRES", "USES", "NOTE"], &rows)
}
