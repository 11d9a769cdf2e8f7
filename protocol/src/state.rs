//! The volume lifecycle shared by the agent, the central side and the local API.

use std::fmt;

/// `creating → created → initializing → initialized → destroying → (gone)`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Created,
    Initializing,
    Initialized,
    Destroying,
}

impl VolumeState {
    pub const ALL: [VolumeState; 5] = [
        VolumeState::Creating,
        VolumeState::Created,
        VolumeState::Initializing,
        VolumeState::Initialized,
        VolumeState::Destroying,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Created => "created",
            VolumeState::Initializing => "initializing",
            VolumeState::Initialized => "initialized",
            VolumeState::Destroying => "destroying",
        }
    }

    /// Whether a caller may move a volume from `self` to `to` through the state route.
    ///
    /// Forward only: `created → initializing`, `created | initializing → initialized`.
    /// Asking for the current state again is allowed (a no-op). `destroying` is never
    /// requested through this route; it is the destroy path's business.
    pub fn may_advance_to(self, to: VolumeState) -> bool {
        use VolumeState::*;
        matches!(
            (self, to),
            (Created, Initializing)
                | (Created, Initialized)
                | (Initializing, Initialized)
                | (Created, Created)
                | (Initializing, Initializing)
                | (Initialized, Initialized)
        )
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VolumeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VolumeState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown volume state {s:?}; expected one of creating, created, initializing, initialized, destroying"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::VolumeState::*;

    #[test]
    fn state_route_moves_forward_only() {
        assert!(Created.may_advance_to(Initializing));
        assert!(Created.may_advance_to(Initialized));
        assert!(Initializing.may_advance_to(Initialized));
        assert!(Initialized.may_advance_to(Initialized));
        assert!(!Initialized.may_advance_to(Initializing));
        assert!(!Initializing.may_advance_to(Created));
        assert!(!Creating.may_advance_to(Initialized));
        assert!(!Destroying.may_advance_to(Initialized));
        assert!(!Created.may_advance_to(Destroying));
    }
}
