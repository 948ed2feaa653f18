//! The four places events come from. Each has its own raw topic, endpoints and knowledge
//! (see the `clouds` folder).

use std::fmt;

/// Where a raw record came from: the value of the `helios-source` header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Aws,
    Gcp,
    Azure,
    Direct,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::Aws, Source::Gcp, Source::Azure, Source::Direct];

    /// The lower-case name used in topics, headers, metrics and the `events.source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Aws => "aws",
            Source::Gcp => "gcp",
            Source::Azure => "azure",
            Source::Direct => "direct",
        }
    }

    /// Its place in [`Source::ALL`] (for tables with one entry per source).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn index_is_the_place_in_all() {
        for (i, s) in super::Source::ALL.into_iter().enumerate() {
            assert_eq!(s.index(), i, "{s}");
        }
    }
}
