//! Users and groups from the guest's /etc/passwd and /etc/group, parsed directly: the agent
//! is a static binary, and glibc's getpwnam in a static binary would try to load NSS modules
//! of a different glibc at run time.

use std::path::Path;

use crate::message::{ErrorKind, RemoteError};

/// A resolved account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
    pub home: String,
    pub shell: String,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

fn read_db(etc: &Path, file: &str) -> String {
    // A missing or unreadable file is an empty database: numeric ids still work.
    std::fs::read_to_string(etc.join(file)).unwrap_or_default()
}

fn passwd_entries(etc: &Path) -> Vec<PasswdEntry> {
    read_db(etc, "passwd")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 || l.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
                shell: f[6].to_string(),
            })
        })
        .collect()
}

/// (name, gid, members)
fn group_entries(etc: &Path) -> Vec<(String, u32, Vec<String>)> {
    read_db(etc, "group")
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || l.starts_with('#') {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolve a user by name or numeric uid. A numeric uid without an entry is allowed (gid =
/// uid, home `/`), as `su`-less tooling often does.
pub fn resolve_user(spec: &str, etc: &Path) -> Result<UserInfo, RemoteError> {
    let entries = passwd_entries(etc);
    let entry = entries
        .into_iter()
        .find(|e| e.name == spec || spec.parse::<u32>().ok() == Some(e.uid));
    let (name, uid, gid, home, shell) = match entry {
        Some(e) => (e.name, e.uid, e.gid, e.home, e.shell),
        None => match spec.parse::<u32>() {
            Ok(n) => (
                spec.to_string(),
                n,
                n,
                "/".to_string(),
                "/bin/sh".to_string(),
            ),
            Err(_) => {
                return Err(RemoteError::new(
                    ErrorKind::UnknownUser,
                    format!("user {spec:?} is not in the guest's /etc/passwd"),
                ))
            }
        },
    };
    let mut groups = vec![gid];
    for (_, g, members) in group_entries(etc) {
        if members.contains(&name) && !groups.contains(&g) {
            groups.push(g);
        }
    }
    Ok(UserInfo {
        name,
        uid,
        gid,
        groups,
        home,
        shell,
    })
}

/// The account of a uid, for the base environment; None when /etc/passwd lacks it.
pub fn user_by_uid(uid: u32, etc: &Path) -> Option<UserInfo> {
    resolve_user(&uid.to_string(), etc)
        .ok()
        .filter(|u| u.name != uid.to_string() || u.home != "/")
}

/// Resolve a group by name or number.
pub fn resolve_group(spec: &str, etc: &Path) -> Result<u32, RemoteError> {
    if let Some((_, g, _)) = group_entries(etc).into_iter().find(|(n, _, _)| n == spec) {
        return Ok(g);
    }
    spec.parse::<u32>().map_err(|_| {
        RemoteError::new(
            ErrorKind::UnknownUser,
            format!("group {spec:?} is not in the guest's /etc/group"),
        )
    })
}

/// Resolve an owner spec: `user`, `user:group`, `:group`, `user:` (names or numbers).
/// Returns (uid, gid); None leaves that id unchanged. `user` alone also sets the user's
/// primary group, as chown does for `user:`.
pub fn resolve_owner(spec: &str, etc: &Path) -> Result<(Option<u32>, Option<u32>), RemoteError> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if u.is_empty() {
        None
    } else {
        Some(resolve_user(u, etc)?)
    };
    let gid = match g {
        Some(g) if !g.is_empty() => Some(resolve_group(g, etc)?),
        _ => user.as_ref().map(|u| u.gid),
    };
    Ok((user.map(|u| u.uid), gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken line\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:bob,alice\nweird:x:notanumber:alice\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let d = etc();
        let a = resolve_user("alice", d.path()).unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(a.groups, vec![1000, 10]);
        assert_eq!(resolve_user("0", d.path()).unwrap().name, "root");
        assert_eq!(resolve_user("4242", d.path()).unwrap().uid, 4242);
        let e = resolve_user("mallory", d.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UnknownUser);
    }

    #[test]
    fn owners_resolve() {
        let d = etc();
        assert_eq!(
            resolve_owner("alice", d.path()).unwrap(),
            (Some(1000), Some(1000))
        );
        assert_eq!(
            resolve_owner("alice:wheel", d.path()).unwrap(),
            (Some(1000), Some(10))
        );
        assert_eq!(resolve_owner(":wheel", d.path()).unwrap(), (None, Some(10)));
        assert_eq!(resolve_owner("5:6", d.path()).unwrap(), (Some(5), Some(6)));
        assert!(resolve_owner("alice:nogroup", d.path()).is_err());
    }
}
