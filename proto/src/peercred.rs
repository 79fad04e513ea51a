//! Who may use a local umem socket: umemd's socket and every VMM control socket hand whoever is
//! served a VM (its RAM, its vCPUs), so both decide from the kernel's word on the client
//! (`SO_PEERCRED`) with the one allow list here, and make their socket files alike.
//!
//! The decision ([`AllowList::check`]) and the socket file's mode ([`restrict_socket`]) need
//! nothing but std. Reading a connection's credentials and looking groups up by name need
//! `nix`, behind the `peercred` feature, so a VMM that only speaks the local protocol through
//! `umem-client` does not pull it in.

use std::path::Path;

/// A local client as the kernel saw it when it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its effective user id.
    pub uid: u32,
    /// Its effective (primary) group id; supplementary groups are not in `SO_PEERCRED`.
    pub gid: u32,
    /// Its process id.
    pub pid: i32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} (gid {}, pid {})", self.uid, self.gid, self.pid)
    }
}

/// Why a local client is not served, or a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The client is in no part of the allow list.
    #[error("{peer} is not allowed to use {service}; allow it with --allow-uid {} or --allow-gid {}", peer.uid, peer.gid)]
    Refused {
        /// The client.
        peer: Peer,
        /// What it tried to use ("umemd", "this VM's control socket").
        service: String,
    },
    /// `SO_PEERCRED` could not be read.
    #[error("reading the client's credentials: {0}")]
    Credentials(#[source] std::io::Error),
    /// No group of that name.
    #[error("group {0:?} does not exist")]
    NoGroup(String),
    /// The group database could not be read.
    #[error("looking up group {name:?}: {err}")]
    GroupLookup {
        /// The name asked for.
        name: String,
        /// Why the lookup failed.
        #[source]
        err: std::io::Error,
    },
    /// The socket file's owner or mode could not be set.
    #[error("socket {path}: {what}: {err}")]
    SocketFile {
        /// The socket file.
        path: String,
        /// What failed.
        what: String,
        /// Why.
        #[source]
        err: std::io::Error,
    },
}

/// Who is served: root, the process's own user, and the users and primary groups the operator
/// listed (`--allow-uid`, `--allow-gid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    owner: u32,
    uids: Vec<u32>,
    gids: Vec<u32>,
}

impl AllowList {
    /// Root, `owner` (the serving process's effective uid), `uids` and members of `gids`.
    pub fn new(owner: u32, uids: Vec<u32>, gids: Vec<u32>) -> Self {
        AllowList { owner, uids, gids }
    }

    /// As [`AllowList::new`] for this process's effective uid.
    #[cfg(feature = "peercred")]
    pub fn for_this_process(uids: Vec<u32>, gids: Vec<u32>) -> Self {
        Self::new(nix::unistd::geteuid().as_raw(), uids, gids)
    }

    /// Serves `peer` if its uid is root, the owner's or listed, or its primary gid is listed;
    /// `service` names what is refused in the error.
    pub fn check(&self, peer: &Peer, service: &str) -> Result<(), TrustError> {
        if peer.uid == 0
            || peer.uid == self.owner
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
        {
            Ok(())
        } else {
            Err(TrustError::Refused {
                peer: *peer,
                service: service.into(),
            })
        }
    }

    /// One line for the log: who is served.
    pub fn describe(&self) -> String {
        let mut s = format!("root and uid {}", self.owner);
        if !self.uids.is_empty() {
            s += &format!(", uids {:?}", self.uids);
        }
        if !self.gids.is_empty() {
            s += &format!(", primary gids {:?}", self.gids);
        }
        s
    }
}

/// The credentials of the process at the other end of `conn`.
#[cfg(feature = "peercred")]
pub fn peer_of(conn: &std::os::unix::net::UnixStream) -> Result<Peer, TrustError> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| TrustError::Credentials(e.into()))?;
    Ok(Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    })
}

/// Reads `--socket-group`/`--control-group`/`--allow-gid`: a number is taken as a gid as it
/// is (a group need not be in `/etc/group` to own a file); a name must exist.
#[cfg(feature = "peercred")]
pub fn resolve_group(spec: &str) -> Result<u32, TrustError> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(TrustError::NoGroup(spec.into())),
        Err(e) => Err(TrustError::GroupLookup {
            name: spec.into(),
            err: e.into(),
        }),
    }
}

/// Makes the socket file at `path` its owner's alone (`0600`), or, with `group`, its owner's
/// and that group's (`0660`, group-owned by it). Called right after `bind`, whatever the umask;
/// the allow list still decides who of those who can connect is served.
pub fn restrict_socket(path: &Path, group: Option<u32>) -> Result<(), TrustError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: String| {
        let path = path.display().to_string();
        move |err| TrustError::SocketFile { path, what, err }
    };
    // Closed first, so that no moment has the wrong group with group access.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(fail("chmod 0600".into()))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(fail(format!("chown to group {gid}")))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(fail("chmod 0660".into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer { uid, gid, pid: 42 }
    }

    #[test]
    fn root_and_owner_are_always_served() {
        let a = AllowList::new(1000, vec![], vec![]);
        assert!(a.check(&peer(0, 0), "umemd").is_ok());
        assert!(a.check(&peer(0, 5000), "umemd").is_ok());
        assert!(a.check(&peer(1000, 1000), "umemd").is_ok());
        assert!(a.check(&peer(1001, 1000), "umemd").is_err());
    }

    #[test]
    fn listed_uid_or_primary_gid_is_served() {
        let a = AllowList::new(0, vec![2000], vec![3000]);
        assert!(a.check(&peer(2000, 1), "umemd").is_ok());
        assert!(a.check(&peer(7, 3000), "umemd").is_ok());
        // A listed gid is a group, not a user; a listed uid is a user, not a group.
        assert!(a.check(&peer(3000, 7), "umemd").is_err());
        assert!(a.check(&peer(7, 2000), "umemd").is_err());
    }

    #[test]
    fn refusal_names_the_client_and_how_to_allow_it() {
        let a = AllowList::new(0, vec![], vec![]);
        let e = a
            .check(
                &Peer {
                    uid: 65534,
                    gid: 65533,
                    pid: 77,
                },
                "umemd",
            )
            .unwrap_err();
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        for want in [
            "uid 65534",
            "pid 77",
            "not allowed to use umemd",
            "--allow-uid 65534",
            "--allow-gid 65533",
        ] {
            assert!(m.contains(want), "{want:?} not in {m:?}");
        }
    }

    #[test]
    fn socket_file_is_private_or_group_shared() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("umem-peercred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        restrict_socket(&path, None).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        // Our own primary group: a group any owner may give its files.
        let gid = m.gid();
        restrict_socket(&path, Some(gid)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, gid));
        let e = restrict_socket(&dir.join("missing.sock"), None).unwrap_err();
        assert!(e.to_string().contains("missing.sock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(feature = "peercred")]
    #[test]
    fn groups_by_number_or_existing_name() {
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let e = resolve_group("no-such-group-umem").unwrap_err();
        assert!(matches!(e, TrustError::NoGroup(_)), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[cfg(feature = "peercred")]
    #[test]
    fn peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = peer_of(&a).unwrap();
        assert_eq!(p.pid as u32, std::process::id());
        assert_eq!(p.uid, nix::unistd::geteuid().as_raw());
        assert!(AllowList::for_this_process(vec![], vec![])
            .check(&p, "x")
            .is_ok());
    }
}
