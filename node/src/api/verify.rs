//! `…/members/{peer}/verification`: the safety number of this node and a member, and the
//! member's verification mark (docs/API.md, "Verifying a member").

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use libp2p::PeerId;

use super::{ApiError, ApiResult, ApiState};
use crate::model::{MarkVerifiedRequest, Verification};

fn parse_peer(peer: &str) -> Result<PeerId, ApiError> {
    peer.parse()
        .map_err(|_| ApiError::bad_request(format!("'{peer}' is not a peer id")))
}

/// `GET /v1/groups/{group}/members/{peer}/verification`.
pub(super) async fn verification(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Verification> {
    let Path((group, peer)) = path?;
    let peer = parse_peer(&peer)?;
    Ok(Json(
        s.engine.run(move |e| e.verification(&group, peer)).await?,
    ))
}

/// `PUT /v1/groups/{group}/members/{peer}/verification` with `{"name"?: string}`.
pub(super) async fn mark_verified(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<MarkVerifiedRequest>, JsonRejection>,
) -> ApiResult<Verification> {
    let Path((group, peer)) = path?;
    let peer = parse_peer(&peer)?;
    let Json(body) = body?;
    Ok(Json(
        s.engine
            .run(move |e| e.mark_verified(&group, peer, body.name.as_deref()))
            .await?,
    ))
}

/// `DELETE /v1/groups/{group}/members/{peer}/verification`.
pub(super) async fn unmark_verified(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Verification> {
    let Path((group, peer)) = path?;
    let peer = parse_peer(&peer)?;
    Ok(Json(
        s.engine
            .run(move |e| e.unmark_verified(&group, peer))
            .await?,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kith_client::ClientError;

    use crate::testing::{peer, two_in_a_group};

    fn code(e: &ClientError) -> (u16, &str) {
        match e {
            ClientError::Api { status, code, .. } => (*status, code.as_str()),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Both members compute the same safety number; a mark is set, shown on the member
    /// list, replaced and removed; bad requests are typed errors that store nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn verification_routes() {
        let (a, b, group) = two_in_a_group("friends").await;
        let (pa, pb) = (a.node.peer_id.to_string(), b.node.peer_id.to_string());
        let (ca, cb) = (a.client(), b.client());
        let va = ca.verification("friends", &pb).await.unwrap();
        let vb = cb.verification(&group.id, &pa).await.unwrap();
        assert_eq!(va.safety_number, vb.safety_number);
        assert_eq!(va.qr_payload, vb.qr_payload);
        assert_eq!(va.safety_number.len(), 60);
        assert_eq!(
            (va.group.as_str(), va.peer_id.as_str()),
            (group.id.as_str(), pb.as_str())
        );
        assert!(!va.verified && va.verified_at_ms.is_none() && va.key_changed.is_none());

        let marked = ca
            .mark_verified("friends", &pb, Some(" bob "))
            .await
            .unwrap();
        assert!(marked.verified);
        assert_eq!(marked.name.as_deref(), Some("bob"));
        assert!(marked.verified_at_ms.is_some());
        let members = ca.members("friends").await.unwrap();
        let bob = members.iter().find(|m| m.peer_id == pb).unwrap();
        assert!(bob.verified && bob.key_changed.is_none());
        assert!(!members.iter().find(|m| m.is_self).unwrap().verified);
        // Marks are local: b does not see a as verified.
        assert!(!cb.verification("friends", &pa).await.unwrap().verified);
        let again = ca.mark_verified("friends", &pb, None).await.unwrap();
        assert_eq!(again.name, None);

        // Typed refusals, nothing stored.
        let long = "n".repeat(200);
        let err = ca
            .mark_verified("friends", &pb, Some(&long))
            .await
            .unwrap_err();
        assert_eq!(code(&err), (400, "bad_request"));
        assert_eq!(ca.verification("friends", &pb).await.unwrap().name, None);
        let err = ca.verification("friends", &pa).await.unwrap_err();
        assert_eq!(code(&err), (400, "bad_request"));
        let err = ca.verification("friends", "nope").await.unwrap_err();
        assert_eq!(code(&err), (400, "bad_request"));
        let err = ca
            .mark_verified("friends", &peer(9).to_string(), None)
            .await
            .unwrap_err();
        assert_eq!(code(&err), (404, "not_found"));
        let err = ca.verification("nobody", &pb).await.unwrap_err();
        assert_eq!(code(&err), (404, "not_found"));

        let removed = ca.unmark_verified("friends", &pb).await.unwrap();
        assert!(!removed.verified && removed.verified_at_ms.is_none());
        assert!(ca.unmark_verified("friends", &pb).await.is_ok());
        assert!(
            !ca.members("friends")
                .await
                .unwrap()
                .iter()
                .any(|m| m.verified)
        );
        b.stop().await;
        a.stop().await;
    }
}
