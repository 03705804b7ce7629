//! `kith verify GROUP MEMBER`: the safety number of this node and a member (digits and QR
//! code), comparing a scanned code, and marking the member verified or not.

use clap::Args;
use kith_client::Client;
use kith_client::model::{MemberInfo, Verification};
use kith_client::text::{clean, format_utc, short_peer};
use kith_protocol::verify::{Comparison, VerifyPayload, group_digits};

use super::{CliError, out, print_json, render_qr};

/// `kith verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Group id, unique id prefix or exact name.
    pub group: String,
    /// The member: its PeerId, or a unique end of it (at least 4 characters; `kith group
    /// members` shows them, `kith history` shows the last 8).
    pub member: String,
    /// Mark the member verified, once the safety number matches the one on their screen.
    #[arg(long, conflicts_with = "unmark")]
    pub mark: bool,
    /// Remove the mark.
    #[arg(long, conflicts_with = "scanned")]
    pub unmark: bool,
    /// With --mark: the member's name, recorded with the mark (so a new key under the same
    /// name is noticed later).
    #[arg(long, requires = "mark", value_name = "NAME")]
    pub name: Option<String>,
    /// Compare with the code from the member's screen (the text of its QR code,
    /// `kith-verify:1:…`); with --mark, marks only if it matches.
    #[arg(long, value_name = "CODE")]
    pub scanned: Option<String>,
    /// Do not print the QR code.
    #[arg(long)]
    pub no_qr: bool,
    /// Print the API's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The one member of `members` that `query` names: its full PeerId or a unique suffix of at
/// least 4 characters.
pub fn resolve_member<'a>(
    members: &'a [MemberInfo],
    query: &str,
) -> Result<&'a MemberInfo, CliError> {
    let query = query.trim();
    if let Some(m) = members.iter().find(|m| m.peer_id == query) {
        return Ok(m);
    }
    if query.chars().count() < 4 {
        return Err(CliError::Local(format!(
            "'{}' is too short to name a member; give at least 4 characters of its PeerId",
            clean(query)
        )));
    }
    let found: Vec<&MemberInfo> = members
        .iter()
        .filter(|m| m.peer_id.ends_with(query))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(CliError::Local(format!(
            "no member of the group has a PeerId ending in '{}' (see `kith group members`)",
            clean(query)
        ))),
        many => Err(CliError::Local(format!(
            "'{}' matches {} members ({}); give more characters",
            clean(query),
            many.len(),
            many.iter()
                .map(|m| clean(&m.peer_id))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Runs `kith verify`.
pub async fn verify_command(client: &Client, args: &VerifyArgs) -> Result<(), CliError> {
    let members = client.members(&args.group).await?;
    let member = resolve_member(&members, &args.member)?;
    if member.is_self {
        return Err(CliError::Local(
            "that is this node; verify another member".to_owned(),
        ));
    }
    let peer = member.peer_id.clone();
    let mut v = client.verification(&args.group, &peer).await?;
    let mut notes = Vec::new();
    if let Some(code) = &args.scanned {
        let scanned = VerifyPayload::parse(code)
            .map_err(|e| CliError::Local(format!("the scanned code is refused: {e}")))?;
        let mine = VerifyPayload::parse(&v.qr_payload)
            .map_err(|e| CliError::Local(format!("the node's own code does not parse: {e}")))?;
        match mine.compare(&scanned) {
            Comparison::Match => {
                notes.push("the scanned code matches: both of you see the same keys".to_owned())
            }
            Comparison::Different => {
                return Err(CliError::Local(format!(
                    "the safety numbers differ: {} sees other keys than this node; do not mark it verified",
                    short_peer(&peer)
                )));
            }
            Comparison::OtherMembers => {
                return Err(CliError::Local(
                    "the scanned code is for another pair of members".to_owned(),
                ));
            }
        }
    }
    if args.mark {
        v = client
            .mark_verified(&args.group, &peer, args.name.as_deref())
            .await?;
        notes.push(format!("marked {} verified", short_peer(&peer)));
    } else if args.unmark {
        v = client.unmark_verified(&args.group, &peer).await?;
        notes.push(format!("removed the mark of {}", short_peer(&peer)));
    }
    if args.json {
        return print_json(&v);
    }
    out(&verification_text(&v, &args.group, !args.no_qr, &notes))
}

/// What `kith verify` prints.
pub fn verification_text(v: &Verification, group: &str, qr: bool, notes: &[String]) -> String {
    let mut lines = Vec::new();
    lines.extend(notes.iter().cloned());
    lines.push(format!(
        "Safety number of this node and {}:",
        clean(&v.peer_id)
    ));
    lines.push(String::new());
    for line in group_digits(&clean(&v.safety_number)) {
        lines.push(format!("    {line}"));
    }
    if qr {
        match render_qr(&v.qr_payload) {
            Some(code) => {
                lines.push(String::new());
                lines.push(code.trim_end().to_owned());
            }
            None => lines.push("(the code is too long for a QR code)".to_owned()),
        }
        lines.push(format!("code: {}", clean(&v.qr_payload)));
    }
    lines.push(String::new());
    if let Some(change) = &v.key_changed {
        lines.push(format!("WARNING: {}", clean(&change.message)));
    }
    let who = short_peer(&v.peer_id);
    if v.verified {
        let when = v
            .verified_at_ms
            .map(|ms| format!(" on {} UTC", format_utc(ms / 1000)))
            .unwrap_or_default();
        let name = v
            .name
            .as_deref()
            .map(|n| format!(" as '{}'", clean(n)))
            .unwrap_or_default();
        lines.push(format!("✓ {who} is verified{name}{when}."));
    } else {
        lines.push(format!(
            "{who} is not verified. Compare the digits with the ones on their screen (in \
             person or on a call you trust), or scan their code; if they match, run `kith \
             verify {} {who} --mark`.",
            shell_word(group)
        ));
    }
    lines.join("\n")
}

/// `text` as one shell word: as it is if it is plain, else in single quotes.
fn shell_word(text: &str) -> String {
    let text = clean(text);
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// The mark column of `kith group members` and `kith group show`.
pub fn member_mark(m: &MemberInfo) -> &'static str {
    if m.verified {
        "  ✓ verified"
    } else if m.key_changed.is_some() {
        "  ! key changed"
    } else {
        ""
    }
}

/// Warning lines for members whose key changed.
pub fn key_change_warnings(members: &[MemberInfo]) -> Vec<String> {
    members
        .iter()
        .filter_map(|m| m.key_changed.as_ref())
        .map(|c| format!("WARNING: {}", clean(&c.message)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use kith_client::model::KeyChangeInfo;

    fn member(peer: &str, is_self: bool) -> MemberInfo {
        MemberInfo {
            peer_id: peer.to_owned(),
            leaf_index: 0,
            is_self,
            name: None,
            label: String::new(),
            verified: false,
            key_changed: None,
        }
    }

    #[test]
    fn members_are_found_by_peer_id_or_unique_suffix() {
        let members = vec![
            member("12D3KooWaaaa1111", true),
            member("12D3KooWbbbb2222", false),
            member("12D3KooWcccc2222", false),
        ];
        assert_eq!(
            resolve_member(&members, "12D3KooWbbbb2222")
                .unwrap()
                .peer_id,
            "12D3KooWbbbb2222"
        );
        assert_eq!(
            resolve_member(&members, "b2222").unwrap().peer_id,
            "12D3KooWbbbb2222"
        );
        let err = resolve_member(&members, "2222").unwrap_err().to_string();
        assert!(err.contains("matches 2 members"), "{err}");
        let err = resolve_member(&members, "zzzzz").unwrap_err().to_string();
        assert!(err.contains("no member"), "{err}");
        let err = resolve_member(&members, "22").unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn the_text_shows_digits_in_three_lines_and_the_state() {
        let v = Verification {
            group: "ab".repeat(32),
            peer_id: "12D3KooWbbbb2222".into(),
            self_peer_id: "12D3KooWaaaa1111".into(),
            safety_number: (0..60).map(|i| char::from(b'0' + (i % 10) as u8)).collect(),
            qr_payload: "kith-verify:1:x".into(),
            verified: false,
            verified_at_ms: None,
            name: None,
            key_changed: Some(KeyChangeInfo {
                reason: "key_mismatch".into(),
                verified_peer: "12D3KooWbbbb2222".into(),
                name: None,
                since_ms: None,
                message: "the key changed".into(),
            }),
        };
        let text = verification_text(&v, "book club", false, &[]);
        assert!(text.contains("    01234 56789 01234 56789\n"), "{text}");
        assert_eq!(text.matches("01234 56789 01234 56789").count(), 3);
        assert!(text.contains("WARNING: the key changed"));
        assert!(text.contains("bbbb2222 is not verified"));
        assert!(
            text.contains("`kith verify 'book club' bbbb2222 --mark`"),
            "{text}"
        );
        let verified = Verification {
            verified: true,
            verified_at_ms: Some(0),
            name: Some("bob".into()),
            key_changed: None,
            ..v
        };
        let text = verification_text(&verified, "friends", true, &["marked".into()]);
        assert!(text.starts_with("marked\n"));
        assert!(
            text.contains("✓ bbbb2222 is verified as 'bob' on 1970-01-01 00:00:00 UTC."),
            "{text}"
        );
        assert!(text.contains("code: kith-verify:1:x"));
    }
}
