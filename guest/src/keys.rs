//! Key delivery inside the guest: released keys become files in a tmpfs
//! directory (default [`DEFAULT_KEY_DIR`]) that the services of the VM
//! read, one file per key, named after the key.
//!
//! [`KeyDir::open`] takes the directory as it finds it only if nobody else
//! could have prepared it: not a symlink, owned by the agent (or by the
//! configured key owner), writable by nobody else. It creates a missing one
//! (mode 0700, or 0750 with the configured group; owned by the configured
//! key owner, who must be able to enter it). Everything afterwards
//! goes through the directory's descriptor, so swapping the path for
//! something else after the checks changes nothing.
//!
//! [`KeyDir::install`] replaces a key atomically: the material goes to a
//! fresh temporary file (`O_EXCL|O_NOFOLLOW`, mode 0400, 0440 with a group),
//! is synced, then renamed over the key's name; `rename` replaces whatever
//! is there, a planted symlink included, and never follows it. A reader
//! sees the old key or the new one, never a mix. The version of each key
//! is kept next to them in [`VERSIONS_FILE`] (names and numbers, no
//! secret), written the same way, so it survives a restart of the agent.
//!
//! The directory should be a tmpfs (or ramfs): anywhere else the keys
//! reach a disk. That is not refused here, because a VM image might have
//! no other choice, but [`KeyDir::on_tmpfs`] lets the caller warn.
//!
//! Errors name files and keys, never material.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat};
use nix::sys::statfs::{TMPFS_MAGIC, fstatfs};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fsync, geteuid, unlinkat};
use ring::rand::{SecureRandom as _, SystemRandom};
use vkx_common::wire::{KeyMaterial, KeyName, MAX_KEY_MATERIAL, ReleasedKey};
use zeroize::Zeroizing;

/// Where keys are delivered unless configured otherwise (a tmpfs on
/// systemd machines).
pub const DEFAULT_KEY_DIR: &str = "/run/vkx/keys";
/// The versions of the installed keys, a JSON map name → version.
pub const VERSIONS_FILE: &str = ".versions";
/// Temporary files start with this; any left at open are a crash's.
pub const TEMP_PREFIX: &str = ".tmp-";
/// Largest versions file read: about 800 keys of the longest names,
/// far more than a VM holds.
pub const MAX_VERSIONS_FILE: usize = 64 * 1024;
/// Random bytes in a temporary file's name: names never collide, and
/// nobody can prepare one in advance.
const TEMP_RANDOM_LEN: usize = 8;
/// The directory's mode without a group, and with one.
const DIR_MODE: u32 = 0o700;
const DIR_MODE_GROUP: u32 = 0o750;
/// A key file's mode without a group, and with one. The descriptor that
/// creates the file may write it whatever the mode says.
const KEY_MODE: u32 = 0o400;
const KEY_MODE_GROUP: u32 = 0o440;
/// The mode of the versions file (no secret; the agent's own).
const VERSIONS_MODE: u32 = 0o400;
/// Mode bits that let someone other than the owner write.
const FOREIGN_WRITE: u32 = 0o022;
/// ramfs' `f_type` (linux/magic.h); not among nix' constants.
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// Why the key directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyDirError {
    #[error("{}: is a symbolic link; keys are not delivered through one", path.display())]
    Symlink { path: PathBuf },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{}: owned by uid {uid}, neither the agent's ({ours}) nor the key owner's", path.display())]
    Owner { path: PathBuf, uid: u32, ours: u32 },
    #[error("{}: mode {mode:04o} lets group or others write", path.display())]
    Writable { path: PathBuf, mode: u32 },
    #[error("key name {name:?} starts with '.': reserved in the key directory")]
    ReservedName { name: String },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: key file is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: key file is larger than {MAX_KEY_MATERIAL} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: {reason} (delete it to start over)", path.display())]
    Versions { path: PathBuf, reason: String },
    #[error("no randomness for a temporary file name")]
    Random,
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> KeyDirError + 'a {
    move |source| KeyDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn errno_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> KeyDirError + 'a {
    move |e| KeyDirError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// The directory keys are delivered to. Holds names and versions, never
/// material.
#[derive(Debug)]
pub struct KeyDir {
    path: PathBuf,
    /// The directory, opened without following a symlink, as checked.
    dir: OwnedFd,
    owner: Option<Uid>,
    group: Option<Gid>,
    on_tmpfs: bool,
    /// Name → installed version; the lock also serialises installs so the
    /// versions file follows the key files in order.
    versions: Mutex<BTreeMap<String, u32>>,
}

impl KeyDir {
    /// Opens (and creates if missing) the key directory; key files will
    /// belong to `owner` and `group` where given (the agent must be allowed
    /// to give them away: root, normally).
    pub fn open(dir: &Path, owner: Option<u32>, group: Option<u32>) -> Result<Self, KeyDirError> {
        let owner = owner.map(Uid::from_raw);
        let group = group.map(Gid::from_raw);
        let created = create_if_missing(dir, group.is_some())?;
        let fd = nix::fcntl::open(
            dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ELOOP => KeyDirError::Symlink {
                path: dir.to_path_buf(),
            },
            Errno::ENOTDIR => KeyDirError::NotADirectory {
                path: dir.to_path_buf(),
            },
            e => errno_err("open", dir)(e),
        })?;
        if created {
            // The umask may have taken bits away, and the group is ours
            // to set; the owner must be able to enter to read its keys.
            if owner.is_some() || group.is_some() {
                fchown(&fd, owner, group).map_err(errno_err("chown", dir))?;
            }
            let mode = if group.is_some() {
                DIR_MODE_GROUP
            } else {
                DIR_MODE
            };
            fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(errno_err("chmod", dir))?;
        }
        let st = fstat(&fd).map_err(errno_err("stat", dir))?;
        let ours = geteuid();
        if st.st_uid != ours.as_raw() && Some(Uid::from_raw(st.st_uid)) != owner {
            return Err(KeyDirError::Owner {
                path: dir.to_path_buf(),
                uid: st.st_uid,
                ours: ours.as_raw(),
            });
        }
        let mode = st.st_mode & 0o7777;
        if mode & FOREIGN_WRITE != 0 {
            return Err(KeyDirError::Writable {
                path: dir.to_path_buf(),
                mode,
            });
        }
        let fs = fstatfs(&fd).map_err(errno_err("statfs", dir))?;
        let on_tmpfs = is_memory_fs(fs.filesystem_type());
        let this = Self {
            path: dir.to_path_buf(),
            dir: fd,
            owner,
            group,
            on_tmpfs,
            versions: Mutex::new(BTreeMap::new()),
        };
        this.remove_stale_temp_files()?;
        let versions = this.load_versions()?;
        *this.lock() = versions;
        Ok(this)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the directory is on tmpfs or ramfs. If not, installed keys
    /// reach a disk: warn.
    pub fn on_tmpfs(&self) -> bool {
        self.on_tmpfs
    }

    /// Installs `key` as `dir/NAME`, atomically replacing what was there,
    /// and records its version. Returns the key file's path.
    pub fn install(&self, key: &ReleasedKey) -> Result<PathBuf, KeyDirError> {
        let name = file_name(&key.name)?;
        let mode = if self.group.is_some() {
            KEY_MODE_GROUP
        } else {
            KEY_MODE
        };
        let mut versions = self.lock();
        self.write_atomic(name, key.material.expose(), mode, true)?;
        let mut next = versions.clone();
        next.insert(name.to_owned(), key.version);
        let mut json = serde_json::to_vec(&next).map_err(|e| KeyDirError::Versions {
            path: self.path.join(VERSIONS_FILE),
            reason: e.to_string(),
        })?;
        json.push(b'\n');
        self.write_atomic(VERSIONS_FILE, &json, VERSIONS_MODE, false)?;
        *versions = next;
        Ok(self.path.join(name))
    }

    /// The material of an installed key, `None` if there is none.
    pub fn read(&self, name: &KeyName) -> Result<Option<KeyMaterial>, KeyDirError> {
        let file = file_name(name)?;
        let path = self.path.join(file);
        let Some(mut f) = self.open_regular(file, &path)? else {
            return Ok(None);
        };
        // A fixed buffer read in place: nothing reallocates (which would
        // leave a copy behind) and no probe buffer on the stack sees it.
        let mut buf = Zeroizing::new(vec![0u8; MAX_KEY_MATERIAL + 1]);
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", &path)(e)),
            }
        }
        if filled > MAX_KEY_MATERIAL {
            return Err(KeyDirError::TooLarge { path });
        }
        if filled == 0 {
            return Err(KeyDirError::Empty { path });
        }
        buf.truncate(filled);
        Ok(Some(KeyMaterial::new(std::mem::take(&mut *buf))))
    }

    /// The version recorded for an installed key (`None` if the key file
    /// is not there, whatever the record says).
    pub fn installed_version(&self, name: &KeyName) -> Option<u32> {
        let file = file_name(name).ok()?;
        let st = nix::sys::stat::fstatat(&self.dir, file, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .ok()?;
        if !is_regular(&st) {
            return None;
        }
        self.lock().get(file).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u32>> {
        // The map is replaced whole after each successful write: a panic
        // elsewhere cannot leave it half updated.
        self.versions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `bytes` to `dir/name` by temp file, fsync, rename, fsync of
    /// the directory.
    fn write_atomic(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        give_away: bool,
    ) -> Result<(), KeyDirError> {
        let tmp = temp_name(name)?;
        let tmp_path = self.path.join(&tmp);
        let fd = openat(
            &self.dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )
        .map_err(errno_err("create", &tmp_path))?;
        let result = self.fill_and_rename(fd, &tmp, name, bytes, mode, give_away);
        if result.is_err() {
            // Best effort: open removes leftovers anyway.
            let _ = unlinkat(&self.dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    fn fill_and_rename(
        &self,
        fd: OwnedFd,
        tmp: &str,
        name: &str,
        bytes: &[u8],
        mode: u32,
        give_away: bool,
    ) -> Result<(), KeyDirError> {
        let tmp_path = &self.path.join(tmp);
        // Exactly `mode`, whatever the umask.
        fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(errno_err("chmod", tmp_path))?;
        if give_away && (self.owner.is_some() || self.group.is_some()) {
            fchown(&fd, self.owner, self.group).map_err(errno_err("chown", tmp_path))?;
        }
        let mut f = File::from(fd);
        f.write_all(bytes).map_err(io_err("write", tmp_path))?;
        f.sync_all().map_err(io_err("fsync", tmp_path))?;
        drop(f);
        let path = self.path.join(name);
        renameat(&self.dir, tmp, &self.dir, name).map_err(errno_err("rename", &path))?;
        fsync(&self.dir).map_err(errno_err("fsync", &self.path))
    }

    /// Opens `dir/name` for reading if it is a regular file; `None` if it
    /// does not exist. Never follows a symlink, never blocks on a FIFO.
    fn open_regular(&self, name: &str, path: &Path) -> Result<Option<File>, KeyDirError> {
        let fd = match openat(
            &self.dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(KeyDirError::NotAFile {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(errno_err("open", path)(e)),
        };
        let st = fstat(&fd).map_err(errno_err("stat", path))?;
        if !is_regular(&st) {
            return Err(KeyDirError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Ok(Some(File::from(fd)))
    }

    fn remove_stale_temp_files(&self) -> Result<(), KeyDirError> {
        let mut d = Dir::openat(
            &self.dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_err("list", &self.path))?;
        let mut stale = Vec::new();
        for entry in d.iter() {
            let entry = entry.map_err(errno_err("list", &self.path))?;
            let name = entry.file_name().to_bytes();
            if name.starts_with(TEMP_PREFIX.as_bytes())
                && entry.file_type() != Some(Type::Directory)
            {
                stale.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        for name in stale {
            match unlinkat(&self.dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(errno_err("remove", &self.path.join(&name))(e)),
            }
        }
        Ok(())
    }

    fn load_versions(&self) -> Result<BTreeMap<String, u32>, KeyDirError> {
        let path = self.path.join(VERSIONS_FILE);
        let Some(f) = self.open_regular(VERSIONS_FILE, &path)? else {
            return Ok(BTreeMap::new());
        };
        let mut text = Vec::new();
        f.take(MAX_VERSIONS_FILE as u64 + 1)
            .read_to_end(&mut text)
            .map_err(io_err("read", &path))?;
        let bad = |reason: String| KeyDirError::Versions {
            path: path.clone(),
            reason,
        };
        if text.len() > MAX_VERSIONS_FILE {
            return Err(bad(format!("larger than {MAX_VERSIONS_FILE} bytes")));
        }
        let map: BTreeMap<String, u32> =
            serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        for name in map.keys() {
            let valid = KeyName::new(name.as_str()).ok();
            if valid.is_none_or(|n| file_name(&n).is_err()) {
                return Err(bad(format!("{name:?} is not a key name")));
            }
        }
        Ok(map)
    }
}

/// Creates the directory (mode `DIR_MODE`, parents 0755) if missing;
/// true if this call created it.
fn create_if_missing(dir: &Path, group: bool) -> Result<bool, KeyDirError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(KeyDirError::Symlink {
            path: dir.to_path_buf(),
        }),
        Ok(m) if !m.is_dir() => Err(KeyDirError::NotADirectory {
            path: dir.to_path_buf(),
        }),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io_err("create", parent))?;
            }
            let mode = if group { DIR_MODE_GROUP } else { DIR_MODE };
            match std::fs::DirBuilder::new().mode(mode).create(dir) {
                Ok(()) => Ok(true),
                // Someone else was faster: check theirs like any other.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(io_err("create", dir)(e)),
            }
        }
        Err(e) => Err(io_err("stat", dir)(e)),
    }
}

/// The key's file name: its wire name, which has no '/' (wire names are
/// `[A-Za-z0-9._:+-]`); names starting with '.' are refused ('.', '..',
/// the versions and temporary files).
fn file_name(name: &KeyName) -> Result<&str, KeyDirError> {
    let s = name.as_str();
    if s.starts_with('.') || s.contains('/') {
        return Err(KeyDirError::ReservedName { name: s.to_owned() });
    }
    Ok(s)
}

fn temp_name(name: &str) -> Result<String, KeyDirError> {
    let mut random = [0u8; TEMP_RANDOM_LEN];
    SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| KeyDirError::Random)?;
    let mut tmp = format!("{TEMP_PREFIX}{name}-");
    for b in random {
        let _ = write!(tmp, "{b:02x}");
    }
    Ok(tmp)
}

fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "filesystem magics are 32-bit; f_type is wider on some targets"
)]
fn is_memory_fs(t: nix::sys::statfs::FsType) -> bool {
    t == TMPFS_MAGIC || t.0 as u32 == RAMFS_MAGIC
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    fn key(name: &str, version: u32, material: &[u8]) -> ReleasedKey {
        ReleasedKey {
            name: KeyName::new(name).unwrap(),
            version,
            material: KeyMaterial::new(material.to_vec()),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn fs_is_memory(p: &Path) -> bool {
        is_memory_fs(nix::sys::statfs::statfs(p).unwrap().filesystem_type())
    }

    #[test]
    fn creates_the_directory_and_installs_with_mode_0400() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run/keys");
        let kd = KeyDir::open(&dir, None, None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let path = kd.install(&key("disk", 1, b"0123456789abcdef")).unwrap();
        assert_eq!(path, dir.join("disk"));
        assert_eq!(mode(&path), 0o400);
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789abcdef");
        let name = KeyName::new("disk").unwrap();
        let back = kd.read(&name).unwrap().unwrap();
        assert_eq!(back.expose(), b"0123456789abcdef");
        assert_eq!(kd.installed_version(&name), Some(1));
        let other = KeyName::new("config").unwrap();
        assert!(kd.read(&other).unwrap().is_none());
        assert_eq!(kd.installed_version(&other), None);
        // Only the key and the versions file: no temporary file left.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [VERSIONS_FILE, "disk"]);
    }

    #[test]
    fn a_group_gets_0750_and_0440() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let gid = nix::unistd::getegid().as_raw();
        let kd = KeyDir::open(&dir, None, Some(gid)).unwrap();
        assert_eq!(mode(&dir), 0o750);
        assert_eq!(std::fs::metadata(&dir).unwrap().gid(), gid);
        let path = kd.install(&key("disk", 1, b"k")).unwrap();
        assert_eq!(mode(&path), 0o440);
        assert_eq!(std::fs::metadata(&path).unwrap().gid(), gid);
    }

    #[test]
    fn replacing_a_key_is_atomic_for_readers() {
        const INSTALLS: usize = 200;
        let tmp = tempfile::tempdir().unwrap();
        let kd = Arc::new(KeyDir::open(tmp.path(), None, None).unwrap());
        let a = [0xaa_u8; 64];
        let b = [0x55_u8; 64];
        kd.install(&key("disk", 1, &a)).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let kd = kd.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let name = KeyName::new("disk").unwrap();
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) {
                    let m = kd.read(&name).unwrap().expect("a key is always there");
                    assert!(
                        m.expose() == a || m.expose() == b,
                        "a torn or foreign key ({} bytes)",
                        m.expose().len()
                    );
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..INSTALLS {
            let m = if i % 2 == 0 { &b } else { &a };
            kd.install(&key("disk", u32::try_from(i).unwrap() + 2, m))
                .unwrap();
        }
        done.store(true, Ordering::Release);
        let reads = reader.join().unwrap();
        assert!(reads > 0);
        assert_eq!(
            kd.installed_version(&KeyName::new("disk").unwrap()),
            Some(u32::try_from(INSTALLS).unwrap() + 1)
        );
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let kd = KeyDir::open(&dir, None, None).unwrap();
        let target = tmp.path().join("victim");
        std::fs::write(&target, b"untouched").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("disk")).unwrap();
        let name = KeyName::new("disk").unwrap();
        // Reading does not follow it either, nor counts it as installed.
        assert!(matches!(kd.read(&name), Err(KeyDirError::NotAFile { .. })));
        assert_eq!(kd.installed_version(&name), None);
        let path = kd.install(&key("disk", 1, b"secret")).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    }

    #[test]
    fn stale_temp_files_are_removed_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join(".tmp-disk-0011223344556677"), b"half").unwrap();
        std::fs::write(dir.join(".tmp-.versions-8899aabbccddeeff"), b"{").unwrap();
        std::fs::write(dir.join("other"), b"kept").unwrap();
        let _kd = KeyDir::open(dir, None, None).unwrap();
        assert!(!dir.join(".tmp-disk-0011223344556677").exists());
        assert!(!dir.join(".tmp-.versions-8899aabbccddeeff").exists());
        assert!(dir.join("other").exists());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        for m in [0o770, 0o702, 0o777] {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(m)).unwrap();
            let e = KeyDir::open(tmp.path(), None, None).unwrap_err();
            assert!(
                matches!(e, KeyDirError::Writable { mode, .. } if mode == m),
                "{m:o}: {e}"
            );
        }
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("keys");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = KeyDir::open(&link, None, None).unwrap_err();
        assert!(matches!(e, KeyDirError::Symlink { .. }), "{e}");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !geteuid().is_root() {
            eprintln!("skipped: giving a directory away needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let stranger = 54_321;
        std::os::unix::fs::chown(tmp.path(), Some(stranger), None).unwrap();
        let e = KeyDir::open(tmp.path(), None, None).unwrap_err();
        assert!(
            matches!(e, KeyDirError::Owner { uid, .. } if uid == stranger),
            "{e}"
        );
        // The configured key owner may own it.
        KeyDir::open(tmp.path(), Some(stranger), None).unwrap();
    }

    #[test]
    fn reserved_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(tmp.path(), None, None).unwrap();
        for name in [".", "..", ".versions", ".tmp-disk-00"] {
            let e = kd.install(&key(name, 1, b"k")).unwrap_err();
            assert!(matches!(e, KeyDirError::ReservedName { .. }), "{name}: {e}");
        }
    }

    #[test]
    fn versions_survive_a_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let kd = KeyDir::open(tmp.path(), None, None).unwrap();
            kd.install(&key("disk", 3, b"one")).unwrap();
            kd.install(&key("config", 7, b"two")).unwrap();
            kd.install(&key("disk", 4, b"three")).unwrap();
        }
        let text = std::fs::read_to_string(tmp.path().join(VERSIONS_FILE)).unwrap();
        assert!(!text.contains("three"), "{text}");
        let kd = KeyDir::open(tmp.path(), None, None).unwrap();
        assert_eq!(
            kd.installed_version(&KeyName::new("disk").unwrap()),
            Some(4)
        );
        assert_eq!(
            kd.installed_version(&KeyName::new("config").unwrap()),
            Some(7)
        );
    }

    #[test]
    fn a_corrupt_versions_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(VERSIONS_FILE), b"{\"../x\": 1}").unwrap();
        let e = KeyDir::open(tmp.path(), None, None).unwrap_err();
        assert!(matches!(e, KeyDirError::Versions { .. }), "{e}");
    }

    #[test]
    fn oversize_and_empty_key_files_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(tmp.path(), None, None).unwrap();
        std::fs::write(tmp.path().join("big"), vec![1u8; MAX_KEY_MATERIAL + 1]).unwrap();
        std::fs::write(tmp.path().join("max"), vec![1u8; MAX_KEY_MATERIAL]).unwrap();
        std::fs::write(tmp.path().join("empty"), b"").unwrap();
        let e = kd.read(&KeyName::new("big").unwrap()).unwrap_err();
        assert!(matches!(e, KeyDirError::TooLarge { .. }), "{e}");
        let m = kd.read(&KeyName::new("max").unwrap()).unwrap().unwrap();
        assert_eq!(m.expose().len(), MAX_KEY_MATERIAL);
        let e = kd.read(&KeyName::new("empty").unwrap()).unwrap_err();
        assert!(matches!(e, KeyDirError::Empty { .. }), "{e}");
    }

    #[test]
    fn tmpfs_is_detected() {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && fs_is_memory(shm) {
            let tmp = tempfile::tempdir_in(shm).unwrap();
            assert!(KeyDir::open(tmp.path(), None, None).unwrap().on_tmpfs());
        } else {
            eprintln!("skipped the positive case: /dev/shm is not a tmpfs here");
        }
        // A disk-backed directory: /tmp, or else the target directory
        // these tests run from (on tmpfs too on some CI machines).
        let exe_dir = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let Some(disk) = [std::env::temp_dir(), exe_dir]
            .into_iter()
            .find(|p| !fs_is_memory(p))
        else {
            eprintln!("skipped the negative case: /tmp and the target dir are both in memory");
            return;
        };
        let tmp = tempfile::tempdir_in(disk).unwrap();
        assert!(!KeyDir::open(tmp.path(), None, None).unwrap().on_tmpfs());
    }

    #[test]
    fn debug_and_errors_show_no_material() {
        let tmp = tempfile::tempdir().unwrap();
        let kd = KeyDir::open(tmp.path(), None, None).unwrap();
        let secret = b"SUPERSECRETMATERIAL";
        kd.install(&key("disk", 1, secret)).unwrap();
        let debug = format!("{kd:?}");
        assert!(!debug.contains("SUPERSECRET"), "{debug}");
        assert!(!debug.contains(&hex::encode(secret)), "{debug}");
        assert!(debug.contains("disk"), "{debug}");
        // A failing install (the file name is taken by a directory).
        std::fs::create_dir(tmp.path().join("cfg")).unwrap();
        let e = kd.install(&key("cfg", 1, secret)).unwrap_err();
        let text = format!("{e} {e:?}");
        assert!(!text.contains("SUPERSECRET"), "{text}");
        assert!(!text.contains(&hex::encode(secret)), "{text}");
    }
}
