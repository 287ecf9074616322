//! Plugin identifiers (`notify/slack`), versions (semver) and `id@version` references.
//!
//! Rules (every violation names the rule it broke):
//! - an id is one or more `/`-separated segments, each `[a-z0-9][a-z0-9._-]*`;
//! - no segment is `.` or `..`, no leading or trailing `/`, no empty segment;
//! - at most [`MAX_PLUGIN_ID_LEN`] bytes;
//! - a version is a semantic version (`1.2.3`, `1.0.0-rc.1`), at most
//!   [`MAX_VERSION_LEN`] bytes.

use std::fmt;
use std::str::FromStr;

/// Longest accepted plugin id, in bytes.
pub const MAX_PLUGIN_ID_LEN: usize = 128;
/// Longest accepted version string, in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// A plugin id, version or reference that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginRefError {
    /// The id is empty.
    #[error("plugin id is empty: it must be lowercase path segments like `notify/slack`")]
    EmptyId,
    /// The id is too long.
    #[error("plugin id is {len} bytes long: at most {MAX_PLUGIN_ID_LEN} are allowed")]
    IdTooLong {
        /// Its length.
        len: usize,
    },
    /// Leading `/`, trailing `/` or `//`.
    #[error("plugin id {id:?} has an empty segment: no leading, trailing or doubled `/`")]
    EmptySegment {
        /// The offending id.
        id: String,
    },
    /// A `.` or `..` segment.
    #[error("plugin id {id:?} has a `.` or `..` segment, which is not allowed")]
    DotSegment {
        /// The offending id.
        id: String,
    },
    /// A segment with characters outside `[a-z0-9._-]` or not starting with `[a-z0-9]`.
    #[error(
        "plugin id segment {segment:?} is invalid: each segment must match [a-z0-9][a-z0-9._-]*"
    )]
    BadSegment {
        /// The offending segment (truncated).
        segment: String,
    },
    /// The version is not semver.
    #[error("version {version:?} is not a semantic version like 1.2.3: {reason}")]
    BadVersion {
        /// The offending version (truncated).
        version: String,
        /// Why semver rejected it.
        reason: String,
    },
    /// The version is too long.
    #[error("version is {len} bytes long: at most {MAX_VERSION_LEN} are allowed")]
    VersionTooLong {
        /// Its length.
        len: usize,
    },
    /// A reference without `@`.
    #[error("plugin reference {got:?} must be ID@VERSION, e.g. notify/slack@1.0.0")]
    MissingAt {
        /// The offending reference (truncated).
        got: String,
    },
}

fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A validated plugin id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginId(String);

impl PluginId {
    /// Validates `id` against the rules in the module documentation.
    pub fn parse(id: &str) -> Result<Self, PluginRefError> {
        if id.is_empty() {
            return Err(PluginRefError::EmptyId);
        }
        if id.len() > MAX_PLUGIN_ID_LEN {
            return Err(PluginRefError::IdTooLong { len: id.len() });
        }
        for segment in id.split('/') {
            if segment.is_empty() {
                return Err(PluginRefError::EmptySegment { id: shown(id) });
            }
            if segment == "." || segment == ".." {
                return Err(PluginRefError::DotSegment { id: shown(id) });
            }
            let mut bytes = segment.bytes();
            let first_ok = bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            let rest_ok =
                bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
            if !first_ok || !rest_ok {
                return Err(PluginRefError::BadSegment {
                    segment: shown(segment),
                });
            }
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first segment (`notify` for `notify/slack`): the default plugin type.
    pub fn first_segment(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for PluginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a version string (semver); returns it normalised.
pub fn parse_version(version: &str) -> Result<semver::Version, PluginRefError> {
    if version.len() > MAX_VERSION_LEN {
        return Err(PluginRefError::VersionTooLong { len: version.len() });
    }
    semver::Version::parse(version).map_err(|e| PluginRefError::BadVersion {
        version: shown(version),
        reason: e.to_string(),
    })
}

/// A validated `id@version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PluginRef {
    /// The plugin id.
    pub id: PluginId,
    /// The version.
    pub version: semver::Version,
}

impl PluginRef {
    /// Validates an id and a version given separately.
    pub fn new(id: &str, version: &str) -> Result<Self, PluginRefError> {
        Ok(Self {
            id: PluginId::parse(id)?,
            version: parse_version(version)?,
        })
    }

    /// The storage key `id@version`.
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for PluginRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.version)
    }
}

impl FromStr for PluginRef {
    type Err = PluginRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, version) = s
            .rsplit_once('@')
            .ok_or_else(|| PluginRefError::MissingAt { got: shown(s) })?;
        Self::new(id, version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_path_ids() {
        for ok in ["notify/slack", "a", "build/maven-3.x", "x/y/z_1", "0abc"] {
            assert_eq!(PluginId::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(
            PluginId::parse("notify/slack").unwrap().first_segment(),
            "notify"
        );
    }

    #[test]
    fn rejects_bad_ids_naming_the_rule() {
        assert_eq!(PluginId::parse(""), Err(PluginRefError::EmptyId));
        assert!(matches!(
            PluginId::parse("/abs"),
            Err(PluginRefError::EmptySegment { .. })
        ));
        assert!(matches!(
            PluginId::parse("a//b"),
            Err(PluginRefError::EmptySegment { .. })
        ));
        assert!(matches!(
            PluginId::parse("a/"),
            Err(PluginRefError::EmptySegment { .. })
        ));
        assert!(matches!(
            PluginId::parse("a/../b"),
            Err(PluginRefError::DotSegment { .. })
        ));
        assert!(matches!(
            PluginId::parse(".."),
            Err(PluginRefError::DotSegment { .. })
        ));
        for bad in ["Notify", "a b", "a\0b", "ü", "_x", "-x", ".hidden", "a\\b"] {
            assert!(
                matches!(PluginId::parse(bad), Err(PluginRefError::BadSegment { .. })),
                "{bad:?}"
            );
        }
        let long = "a".repeat(MAX_PLUGIN_ID_LEN + 1);
        assert!(matches!(
            PluginId::parse(&long),
            Err(PluginRefError::IdTooLong { .. })
        ));
        assert!(PluginId::parse(&"a".repeat(MAX_PLUGIN_ID_LEN)).is_ok());
        let msg = PluginId::parse("Bad").unwrap_err().to_string();
        assert!(msg.contains("[a-z0-9][a-z0-9._-]*"), "{msg}");
    }

    #[test]
    fn versions_are_semver() {
        assert!(parse_version("1.2.3").is_ok());
        assert!(parse_version("1.0.0-rc.1+build.5").is_ok());
        for bad in ["1", "1.2", "v1.2.3", "", "1.2.3.4", "latest"] {
            assert!(
                matches!(parse_version(bad), Err(PluginRefError::BadVersion { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_version(&"1".repeat(100)),
            Err(PluginRefError::VersionTooLong { .. })
        ));
    }

    #[test]
    fn references_parse() {
        let r: PluginRef = "notify/slack@1.0.0".parse().unwrap();
        assert_eq!(r.key(), "notify/slack@1.0.0");
        assert!(matches!(
            "notify/slack".parse::<PluginRef>(),
            Err(PluginRefError::MissingAt { .. })
        ));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,200}") {
            let _ = PluginId::parse(&s);
            let _ = parse_version(&s);
            let _ = s.parse::<PluginRef>();
        }

        #[test]
        fn valid_ids_roundtrip(segs in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,10}", 1..5)) {
            let id = segs.join("/");
            let parsed = PluginId::parse(&id).unwrap();
            prop_assert_eq!(parsed.as_str(), id.as_str());
        }
    }
}
