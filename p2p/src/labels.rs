//! Agent labels (`key=value`) and label requirements: a requirement is met when the
//! agent carries every required label with the same value.

use std::collections::BTreeMap;

use arcade_proto::v1 as pb;

/// Longest accepted label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 256;
/// Most labels accepted on one agent, plugin or job.
pub const MAX_LABELS: usize = 64;

/// A label that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// Not `key=value`.
    #[error("label {got:?} must be KEY=VALUE")]
    MissingEquals {
        /// The offending text (truncated).
        got: String,
    },
    /// Empty key, or a key with characters outside `[A-Za-z0-9._/-]`.
    #[error(
        "label key {key:?} is invalid: it must be 1-{MAX_LABEL_LEN} characters of [A-Za-z0-9._/-]"
    )]
    BadKey {
        /// The offending key (truncated).
        key: String,
    },
    /// A value that is too long or holds control characters.
    #[error(
        "label value for {key:?} is invalid: at most {MAX_LABEL_LEN} bytes, no control characters"
    )]
    BadValue {
        /// The key.
        key: String,
    },
    /// Too many labels.
    #[error("{count} labels given: at most {MAX_LABELS} are allowed")]
    TooMany {
        /// How many.
        count: usize,
    },
}

/// A set of labels, keyed by label key.
pub type Labels = BTreeMap<String, String>;

fn check(key: &str, value: &str) -> Result<(), LabelError> {
    let key_ok = !key.is_empty()
        && key.len() <= MAX_LABEL_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if !key_ok {
        return Err(LabelError::BadKey {
            key: key.chars().take(80).collect(),
        });
    }
    if value.len() > MAX_LABEL_LEN || value.chars().any(char::is_control) {
        return Err(LabelError::BadValue {
            key: key.to_owned(),
        });
    }
    Ok(())
}

/// Parses `key=value`.
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    let (k, v) = s.split_once('=').ok_or_else(|| LabelError::MissingEquals {
        got: s.chars().take(80).collect(),
    })?;
    check(k, v)?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Validates protobuf labels into a map (a repeated key keeps the last value).
pub fn from_proto(labels: &[pb::Label]) -> Result<Labels, LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany {
            count: labels.len(),
        });
    }
    labels
        .iter()
        .map(|l| check(&l.key, &l.value).map(|()| (l.key.clone(), l.value.clone())))
        .collect()
}

/// Protobuf labels from a map.
pub fn to_proto(labels: &Labels) -> Vec<pb::Label> {
    labels
        .iter()
        .map(|(key, value)| pb::Label {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// True when `have` carries every label in `required` with the same value.
pub fn satisfies(have: &Labels, required: &Labels) -> bool {
    required.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The required labels `have` lacks, as `key=value` strings.
pub fn missing(have: &Labels, required: &Labels) -> Vec<String> {
    required
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_match() {
        assert_eq!(
            parse_label("zone=eu-1").unwrap(),
            ("zone".into(), "eu-1".into())
        );
        assert_eq!(
            parse_label("team=").unwrap(),
            ("team".into(), String::new())
        );
        assert!(matches!(
            parse_label("zone"),
            Err(LabelError::MissingEquals { .. })
        ));
        assert!(matches!(parse_label("=x"), Err(LabelError::BadKey { .. })));
        assert!(matches!(
            parse_label("a b=x"),
            Err(LabelError::BadKey { .. })
        ));
        assert!(matches!(
            parse_label("a=x\ny"),
            Err(LabelError::BadValue { .. })
        ));
        let have: Labels = [("zone".into(), "eu".into()), ("gpu".into(), "yes".into())].into();
        let need: Labels = [("zone".into(), "eu".into())].into();
        assert!(satisfies(&have, &need));
        assert!(satisfies(&have, &Labels::new()));
        let other: Labels = [("zone".into(), "us".into())].into();
        assert!(!satisfies(&have, &other));
        assert_eq!(missing(&have, &other), vec!["zone=us".to_string()]);
    }
}
