//! The API server's syntax rules for names, label keys and label values (apimachinery's
//! `validation.IsDNS1123Subdomain`, `IsDNS1123Label`, `IsQualifiedName`, `IsValidLabelValue`).
//! Each check returns `None` when the text is valid, or what is wrong with it.

/// Longest DNS-1123 subdomain: Pod, NetworkPolicy and Node names, label key prefixes.
pub const DNS1123_SUBDOMAIN_MAX: usize = 253;
/// Longest DNS-1123 label: Namespace names.
pub const DNS1123_LABEL_MAX: usize = 63;
/// Longest label value, and longest name part of a label key.
pub const LABEL_VALUE_MAX: usize = 63;

/// `text` for a message: short texts whole, long ones cut (a name may be megabytes long).
pub fn shown(text: &str) -> String {
    const SHOWN: usize = 64;
    if text.len() <= SHOWN {
        return format!("`{text}`");
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("`{}…` ({} bytes)", &text[..end], text.len())
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A DNS-1123 label: at most 63 of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn dns1123_label(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if text.len() > DNS1123_LABEL_MAX {
        return Some(format!(
            "is {} characters long; at most {DNS1123_LABEL_MAX} are allowed",
            text.len()
        ));
    }
    let b = text.as_bytes();
    let ok = b.iter().all(|&c| is_alnum_lower(c) || c == b'-')
        && is_alnum_lower(b[0])
        && is_alnum_lower(b[b.len() - 1]);
    (!ok).then(|| {
        "must consist of lowercase letters, digits and '-', and start and end with a letter or digit (a DNS-1123 label, e.g. `my-name`)"
            .to_owned()
    })
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels.
pub fn dns1123_subdomain(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("must not be empty".to_owned());
    }
    if text.len() > DNS1123_SUBDOMAIN_MAX {
        return Some(format!(
            "is {} characters long; at most {DNS1123_SUBDOMAIN_MAX} are allowed",
            text.len()
        ));
    }
    let ok = text.split('.').all(|part| {
        let b = part.as_bytes();
        !b.is_empty()
            && b.iter().all(|&c| is_alnum_lower(c) || c == b'-')
            && is_alnum_lower(b[0])
            && is_alnum_lower(b[b.len() - 1])
    });
    (!ok).then(|| {
        "must consist of lowercase letters, digits, '-' and '.', and start and end with a letter or digit (a DNS-1123 subdomain, e.g. `example.com`)"
            .to_owned()
    })
}

/// `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`: the name part of a label key, and a label value.
fn label_chars_ok(text: &str) -> bool {
    let b = text.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key (a qualified name): an optional DNS-1123 subdomain prefix and `/`, then a name of
/// at most 63 characters.
pub fn label_key(text: &str) -> Option<String> {
    let (prefix, name) = match text.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, text),
    };
    if let Some(prefix) = prefix
        && let Some(why) = dns1123_subdomain(prefix)
    {
        return Some(format!("has the prefix {} that {why}", shown(prefix)));
    }
    if name.is_empty() {
        return Some("has an empty name part; a key is `name` or `prefix/name`".to_owned());
    }
    if name.len() > LABEL_VALUE_MAX {
        return Some(format!(
            "has a name part of {} characters; at most {LABEL_VALUE_MAX} are allowed",
            name.len()
        ));
    }
    (!label_chars_ok(name)).then(|| {
        "must be `name` or `prefix/name`, the name made of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            .to_owned()
    })
}

/// A label value: empty, or at most 63 characters of the label charset.
pub fn label_value(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    if text.len() > LABEL_VALUE_MAX {
        return Some(format!(
            "is {} characters long; at most {LABEL_VALUE_MAX} are allowed",
            text.len()
        ));
    }
    (!label_chars_ok(text)).then(|| {
        "must be empty or made of letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
            .to_owned()
    })
}

/// The first invalid label of `labels`: what is wrong with it (the key is named).
pub fn first_bad_label<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Option<String> {
    for (k, v) in labels {
        if let Some(why) = label_key(k) {
            return Some(format!("label key {}", why_of(k, &why)));
        }
        if let Some(why) = label_value(v) {
            return Some(format!(
                "the value of label {}: {}",
                shown(k),
                why_of(v, &why)
            ));
        }
    }
    None
}

/// `"<text> <why>"` with the text shortened.
pub fn why_of(text: &str, why: &str) -> String {
    format!("{} {why}", shown(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(dns1123_subdomain("a.b-c.d9"), None);
        assert!(dns1123_subdomain("UPPER_case!").is_some());
        assert!(dns1123_subdomain("a..b").is_some());
        assert!(dns1123_subdomain("-a").is_some());
        assert!(dns1123_subdomain(&"a".repeat(254)).is_some());
        assert_eq!(dns1123_subdomain(&"a".repeat(253)), None);
        assert_eq!(dns1123_label("kube-system"), None);
        assert!(dns1123_label("a.b").is_some());
        assert!(dns1123_label(&"a".repeat(64)).is_some());
        assert!(dns1123_label("").is_some());
    }

    #[test]
    fn labels() {
        assert_eq!(label_key("app"), None);
        assert_eq!(label_key("kubernetes.io/metadata.name"), None);
        assert_eq!(label_key("A_b.C-9"), None);
        assert!(label_key("/app").is_some());
        assert!(label_key("Example.com/app").is_some());
        assert!(label_key("a/b/c").is_some());
        assert!(label_key("app-").is_some());
        assert!(label_key(&"a".repeat(64)).is_some());
        assert_eq!(
            label_key(&format!("{}/{}", "a".repeat(253), "b".repeat(63))),
            None
        );
        assert_eq!(label_value(""), None);
        assert_eq!(label_value("v1.2_X"), None);
        assert!(label_value("has space").is_some());
        assert!(label_value(&"v".repeat(64)).is_some());
        assert!(shown(&"é".repeat(100)).ends_with("(200 bytes)"));
    }
}
