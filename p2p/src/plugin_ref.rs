//! Plugin identifiers (`notify/slack`), versions (semver) and `id@version` references.
//!
//! Rules (every violation names the rule it broke):
//! - an id is one or more `/`-separated segments, each `[a-z0-9][a-z0-9._-]*`;
//! - no segment is `.` or `..`, no leading or trailing `/`, no empty segment;
//! - at most [`MAX_PLUGIN_ID_LEN`] bytes;
//! - a version is a semantic version (`1.2.3`, `1.0.0-rc.1`), at most
//!   [`MAX_VERSION_LEN`] bytes;
//! - a job may name a [`VersionSelector`] instead: an exact version, a semver range that
//!   starts with an operator (`^1.2`, `~1.2.3`, `>=1.2, <2`) or `latest`.

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
    /// A version selector that is neither a version, a range nor `latest`.
    #[error(
        "version selector {selector:?} is not a version (1.2.3), a range starting with an operator (^1.2, ~1.2.3, >=1.2, <2) or `latest`: {reason}"
    )]
    BadSelector {
        /// The offending selector (truncated).
        selector: String,
        /// Why.
        reason: String,
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

/// Which version of a plugin a job wants: resolved by the coordinator against the
/// enabled versions when the job is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    /// This version and no other (`1.2.3`).
    Exact(semver::Version),
    /// The highest version in a semver range (`^1.2`, `~1.2.3`, `>=1.2, <2`). Cargo's
    /// rules: a pre-release matches only when the range names a pre-release of the same
    /// `major.minor.patch`. Kept with the text it was parsed from, which is what it
    /// shows (semver's own form may differ, e.g. `1.*` for `=1.*`, and would not
    /// parse back as a selector).
    Range(semver::VersionReq, String),
    /// The highest version that is not a pre-release.
    Latest,
}

impl VersionSelector {
    /// Parses a selector. A bare `1.2` is refused rather than read as `^1.2`: a job
    /// names either one version or a range, never something that looks like both.
    pub fn parse(selector: &str) -> Result<Self, PluginRefError> {
        if selector.len() > MAX_VERSION_LEN {
            return Err(PluginRefError::VersionTooLong {
                len: selector.len(),
            });
        }
        let bad = |reason: String| PluginRefError::BadSelector {
            selector: shown(selector),
            reason,
        };
        if selector == "latest" {
            return Ok(Self::Latest);
        }
        if let Ok(v) = semver::Version::parse(selector) {
            return Ok(Self::Exact(v));
        }
        if !selector.starts_with(['^', '~', '=', '>', '<', '*']) {
            return Err(bad("it starts with no range operator".into()));
        }
        semver::VersionReq::parse(selector)
            .map(|req| Self::Range(req, selector.to_owned()))
            .map_err(|e| bad(e.to_string()))
    }

    /// Whether it names one version.
    pub fn is_exact(&self) -> bool {
        matches!(self, Self::Exact(_))
    }

    /// Whether `version` satisfies it.
    pub fn matches(&self, version: &semver::Version) -> bool {
        match self {
            Self::Exact(v) => v == version,
            Self::Range(req, _) => req.matches(version),
            Self::Latest => version.pre.is_empty(),
        }
    }

    /// The highest of `versions` it accepts.
    pub fn pick<'a>(
        &self,
        versions: impl IntoIterator<Item = &'a semver::Version>,
    ) -> Option<&'a semver::Version> {
        versions.into_iter().filter(|v| self.matches(v)).max()
    }
}

impl fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(v) => write!(f, "{v}"),
            Self::Range(_, text) => f.write_str(text),
            Self::Latest => f.write_str("latest"),
        }
    }
}

impl FromStr for VersionSelector {
    type Err = PluginRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A validated `id@selector` (`notify/slack@^1.2`, `notify/slack@latest`, or an exact
/// `id@version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSelector {
    /// The plugin id.
    pub id: PluginId,
    /// Which of its versions.
    pub selector: VersionSelector,
}

impl PluginSelector {
    /// Validates an id and a selector given separately.
    pub fn new(id: &str, selector: &str) -> Result<Self, PluginRefError> {
        Ok(Self {
            id: PluginId::parse(id)?,
            selector: VersionSelector::parse(selector)?,
        })
    }
}

impl fmt::Display for PluginSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.selector)
    }
}

impl FromStr for PluginSelector {
    type Err = PluginRefError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, selector) = s
            .split_once('@')
            .ok_or_else(|| PluginRefError::MissingAt { got: shown(s) })?;
        Self::new(id, selector)
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

    fn versions(list: &[&str]) -> Vec<semver::Version> {
        list.iter().map(|v| v.parse().unwrap()).collect()
    }

    #[test]
    fn selectors_pick_the_highest_match_and_pre_releases_only_when_asked() {
        let all = versions(&[
            "1.0.0",
            "1.2.0",
            "1.2.5",
            "1.3.0-rc.1",
            "1.3.0",
            "1.4.0-beta.2",
            "2.0.0",
            "3.0.0-alpha.1",
        ]);
        let pick = |s: &str| {
            VersionSelector::parse(s)
                .unwrap()
                .pick(&all)
                .map(|v| v.to_string())
        };
        assert_eq!(pick("^1.2").as_deref(), Some("1.3.0"));
        assert_eq!(pick("~1.2.3").as_deref(), Some("1.2.5"));
        assert_eq!(pick("~1.2").as_deref(), Some("1.2.5"));
        assert_eq!(pick(">=1.2, <2").as_deref(), Some("1.3.0"));
        assert_eq!(pick("latest").as_deref(), Some("2.0.0"));
        assert_eq!(pick("*").as_deref(), Some("2.0.0"));
        // Asked for: a pre-release of the same major.minor.patch.
        assert_eq!(pick("^1.4.0-beta.1").as_deref(), Some("1.4.0-beta.2"));
        assert_eq!(pick("1.3.0-rc.1").as_deref(), Some("1.3.0-rc.1"));
        assert_eq!(pick("^3").as_deref(), None);
        assert_eq!(pick("1.1.0").as_deref(), None);
        assert!(VersionSelector::parse("1.2.3").unwrap().is_exact());
        assert!(!VersionSelector::parse("^1.2.3").unwrap().is_exact());
    }

    #[test]
    fn bad_selectors_say_what_a_selector_is() {
        for bad in [
            "1.2",
            "1",
            "v1.2.3",
            "",
            "newest",
            "^x",
            "~",
            "1.2.3 || 2",
            "^1.2 garbage",
        ] {
            let e = VersionSelector::parse(bad).unwrap_err();
            assert!(
                matches!(e, PluginRefError::BadSelector { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains("latest"), "{e}");
        }
        assert!(matches!(
            VersionSelector::parse(&format!("^{}", "1".repeat(100))),
            Err(PluginRefError::VersionTooLong { .. })
        ));
        // Shown as written: semver's own form of `=1.*` is `1.*`, not a selector.
        for text in ["=1.*", ">=1,<2", "~1", "*"] {
            let sel = VersionSelector::parse(text).unwrap();
            assert_eq!(sel.to_string(), text);
            assert_eq!(VersionSelector::parse(&sel.to_string()), Ok(sel));
        }
        let s: PluginSelector = "notify/slack@^1.2".parse().unwrap();
        assert_eq!(s.to_string(), "notify/slack@^1.2");
        assert_eq!(
            "a@latest".parse::<PluginSelector>().unwrap().selector,
            VersionSelector::Latest
        );
        assert!(matches!(
            "notify/slack".parse::<PluginSelector>(),
            Err(PluginRefError::MissingAt { .. })
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
            if let Ok(sel) = VersionSelector::parse(&s) {
                prop_assert_eq!(VersionSelector::parse(&sel.to_string()), Ok(sel));
            }
            let _ = s.parse::<PluginSelector>();
        }

        #[test]
        fn valid_ids_roundtrip(segs in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,10}", 1..5)) {
            let id = segs.join("/");
            let parsed = PluginId::parse(&id).unwrap();
            prop_assert_eq!(parsed.as_str(), id.as_str());
        }
    }
}
