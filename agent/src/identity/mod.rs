//! Agent identity: SPIFFE IDs and, in later steps, X509-SVIDs, the local CA, verification,
//! enrollment and revocation (see the identity issue).

pub mod spiffe;
pub mod svid;
pub mod verify;
