//! The JSON of member verification (`…/members/{peer}/verification`, docs/API.md
//! "Verifying a member"): safety numbers, marks, and key-change notices.

use serde::{Deserialize, Serialize};

/// `GET`, `PUT` and `DELETE /v1/groups/{group}/members/{peer}/verification`: the safety
/// number of this node and the member, and whether this node's user verified the member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// Group id.
    pub group: String,
    /// The member.
    pub peer_id: String,
    /// This node.
    pub self_peer_id: String,
    /// 60 decimal digits, no spaces; shown as 12 groups of 5 (3 lines of 4). The same on
    /// both members.
    pub safety_number: String,
    /// What the QR code encodes: `kith-verify:1:<60 digits>:<PeerId>:<PeerId>`.
    pub qr_payload: String,
    /// Whether this node's user marked the member verified, for its current key.
    pub verified: bool,
    /// When it was marked verified (also for a mark that no longer holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at_ms: Option<u64>,
    /// The name recorded with the mark, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Set when the member's key is not the one verified (see [`KeyChangeInfo`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_changed: Option<KeyChangeInfo>,
}

/// A member whose key is not the one this node's user verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChangeInfo {
    /// `key_mismatch` (this PeerId's key is not the verified key; the mark was dropped) or
    /// `same_name_new_key` (a verified member's name on another PeerId, i.e. a new key).
    pub reason: String,
    /// The PeerId that was verified (the member itself for `key_mismatch`).
    pub verified_peer: String,
    /// The name recorded with the mark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// When this node noticed (`key_mismatch` only: when it dropped the mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// The line to show the user.
    pub message: String,
}

/// `PUT /v1/groups/{group}/members/{peer}/verification` body (`{}` for none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkVerifiedRequest {
    /// The member's display name, recorded with the mark (1 to 128 bytes after trimming),
    /// so a new key under the same name is noticed later.
    #[serde(default)]
    pub name: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::{MemberInfo, NodeEvent};
    use super::*;
    use serde_json::json;

    /// The JSON of docs/API.md, "Verifying a member", field by field.
    #[test]
    fn verification_json_is_the_documented_shape() {
        let v = Verification {
            group: "c9".repeat(32),
            peer_id: "12D3KooWpeer".into(),
            self_peer_id: "12D3KooWself".into(),
            safety_number: "0".repeat(60),
            qr_payload: "kith-verify:1:000:12D3KooWpeer:12D3KooWself".into(),
            verified: true,
            verified_at_ms: Some(1_795_353_513_174),
            name: Some("ann".into()),
            key_changed: None,
        };
        let want = json!({
            "group": "c9".repeat(32), "peer_id": "12D3KooWpeer", "self_peer_id": "12D3KooWself",
            "safety_number": "0".repeat(60),
            "qr_payload": "kith-verify:1:000:12D3KooWpeer:12D3KooWself",
            "verified": true, "verified_at_ms": 1_795_353_513_174_u64, "name": "ann"
        });
        assert_eq!(serde_json::to_value(&v).unwrap(), want);
        assert_eq!(serde_json::from_value::<Verification>(want).unwrap(), v);

        let change = KeyChangeInfo {
            reason: "key_mismatch".into(),
            verified_peer: "12D3KooWpeer".into(),
            name: None,
            since_ms: Some(5),
            message: "m".into(),
        };
        let member = MemberInfo {
            peer_id: "12D3KooWpeer".into(),
            leaf_index: 1,
            is_self: false,
            name: None,
            label: String::new(),
            verified: false,
            key_changed: Some(change.clone()),
        };
        assert_eq!(
            serde_json::to_value(&member).unwrap(),
            json!({"peer_id": "12D3KooWpeer", "leaf_index": 1, "is_self": false,
                   "verified": false, "key_changed": {"reason": "key_mismatch",
                   "verified_peer": "12D3KooWpeer", "since_ms": 5, "message": "m"}})
        );
        // Members from older nodes carry neither field.
        let old: MemberInfo =
            serde_json::from_value(json!({"peer_id": "p", "leaf_index": 0, "is_self": true}))
                .unwrap();
        assert!(!old.verified && old.key_changed.is_none());

        let event = NodeEvent::VerificationLost {
            group: "ab".repeat(32),
            peer: "12D3KooWnew".into(),
            name: Some("ann".into()),
            verified_peer: "12D3KooWold".into(),
            reason: "same_name_new_key".into(),
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"type": "verification_lost", "group": "ab".repeat(32),
                   "peer": "12D3KooWnew", "name": "ann", "verified_peer": "12D3KooWold",
                   "reason": "same_name_new_key", "message": "m"})
        );
        assert_eq!(event.kind(), "verification_lost");
        assert_eq!(event.group(), "ab".repeat(32));
        assert_eq!(
            serde_json::from_value::<MarkVerifiedRequest>(json!({})).unwrap(),
            MarkVerifiedRequest::default()
        );
    }
}
