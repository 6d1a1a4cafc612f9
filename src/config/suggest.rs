//! "Did you mean …?": the closest of the valid words to a mistyped one, when one is close.

/// The candidate closest to `word` by edit distance (ignoring case; swapping two neighbours
/// counts as one edit), if it is within a third of the candidate's length, one edit at least:
/// `timout` -> `timeout`, `ap` -> `app`, but nothing for `colour` among `path_prefix`, `host`
/// and `methods`. Of equally close candidates, the first.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&word, &c.to_lowercase()), c))
        .filter(|&(distance, c)| distance <= (c.chars().count() / 3).max(1))
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| c)
}

/// `` `a`, `b`, `c` ``: words for a message.
pub(crate) fn list<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words
        .into_iter()
        .map(|w| format!("`{w}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_words_are_suggested_and_far_ones_are_not() {
        let keys = ["timeout", "retry_after", "concurrency", "retries"];
        let cases = [
            ("timout", Some("timeout")),
            ("Timeout", Some("timeout")),
            ("tiemout", Some("timeout")),
            ("retry_afetr", Some("retry_after")),
            ("concurency", Some("concurrency")),
            ("retry", None),
            ("colour", None),
            ("", None),
        ];
        for (word, want) in cases {
            assert_eq!(closest(word, keys), want, "{word}");
        }
        // Short words: one edit, not more.
        assert_eq!(closest("ap", ["app", "web"]), Some("app"));
        assert_eq!(closest("a", ["app", "web"]), None);
        // The closest wins over the first; among equals, the first.
        assert_eq!(closest("appp", ["apps", "app"]), Some("apps"));
        assert_eq!(closest("conect", ["connect", "collect"]), Some("connect"));
    }

    #[test]
    fn lists_are_backquoted_and_comma_separated() {
        assert_eq!(list(["a", "b_c"]), "`a`, `b_c`");
        assert_eq!(list([]), "");
    }
}
