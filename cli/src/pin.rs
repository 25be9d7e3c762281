//! Which node a client command trusts at an address: the one given with
//! `--node-id`, or else the one met on the first successful connection (trust on
//! first use), remembered in a file beside the identity file.
//!
//! Without a pin, a machine in the middle could terminate QUIC with its own key
//! and be served every request the client signs. The file holds one `ADDR ID`
//! line per node, is written atomically with mode 0600 and is never silently
//! replaced: a file that cannot be read or parsed is an error, and so is a node
//! that presents another id than the one remembered for its address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use conclave::NodeId;

/// What is appended to the identity file's name to name its pins file.
pub(crate) const PINS_FILE_SUFFIX: &str = ".nodes";
/// The largest pins file read: far more nodes than anyone talks to, and a bound on
/// what a damaged or hostile file can make the client allocate.
const PINS_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// The first line of a written pins file, for whoever opens it.
const PINS_FILE_HEADER: &str = "# Node ids that client commands using this identity trust, one `ADDR ID` per line\n\
     # (written by conclave on first contact; edit a line only if a node's identity changed legitimately).\n";

/// Why a node could not be pinned or was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PinError {
    /// The pins file exists but cannot be read: it is left untouched.
    #[error("cannot read the pinned node ids in {path}: {source}. Fix or move the file; it is not replaced")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The pins file is larger than [`PINS_FILE_BYTES_MAX`].
    #[error(
        "the pinned node ids in {path} exceed {PINS_FILE_BYTES_MAX} bytes; fix or move the file"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may change which node is trusted.
    #[error("the pinned node ids in {path} have mode {mode:04o}: group and others must not write them; run `chmod 600 {path}`")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `ADDR ID`, or an address appears twice.
    #[error("{path} line {line}: {reason}; each line is `ADDR ID` (fix or remove the line)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The node at the address proved another id than the one remembered.
    #[error("the node at {addr} presented the id {presented}, but {path} remembers {remembered} for that address: refusing it (the command was not sent). It may be another machine in the middle; if the node's identity changed legitimately, replace `{addr} {remembered}` in {path}, or run the command once with --node-id {presented}")]
    Mismatch {
        /// The node's address.
        addr: SocketAddr,
        /// The id remembered for it.
        remembered: NodeId,
        /// The id the node proved in the handshake.
        presented: NodeId,
        /// The pins file.
        path: PathBuf,
    },
    /// The pins file could not be written.
    #[error("cannot write the pinned node ids to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// What to do with the node met at an address, given what is remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The node is the remembered one.
    Known,
    /// Nothing was remembered: remember this node.
    Record,
    /// `--node-id` named a node other than the remembered one and the node proved
    /// it: remember the new one (the user said so).
    Replace {
        /// The id remembered until now.
        previous: NodeId,
    },
}

/// The pins file of the identity file at `identity`.
pub(crate) fn pins_path(identity: &Path) -> PathBuf {
    let mut name = identity.as_os_str().to_owned();
    name.push(PINS_FILE_SUFFIX);
    PathBuf::from(name)
}

/// The node ids remembered per address, and the file they live in.
#[derive(Debug)]
pub(crate) struct Pins {
    path: PathBuf,
    nodes: BTreeMap<SocketAddr, NodeId>,
}

impl Pins {
    /// Loads the pins at `path`; none if no file exists. Anything else that keeps
    /// the file from being read is an error, so that it is never overwritten.
    pub(crate) fn load(path: &Path) -> Result<Self, PinError> {
        let read_error = |source| PinError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: path.to_owned(),
                    nodes: BTreeMap::new(),
                })
            }
            Err(e) => return Err(read_error(e)),
        };
        let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(PinError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let mut text = String::new();
        // One byte past the bound, so that a longer file is seen as such.
        (&mut file)
            .take(PINS_FILE_BYTES_MAX + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > PINS_FILE_BYTES_MAX {
            return Err(PinError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(path, &text)
    }

    /// Parses a pins file's text (`#` comments and blank lines are allowed).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, PinError> {
        let mut nodes = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| PinError::Parse {
                path: path.to_owned(),
                line: index + 1,
                reason,
            };
            let mut words = line.split_whitespace();
            let (Some(addr), Some(id), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad(format!("{line:?} is not two words")));
            };
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| bad(format!("address {addr:?}: {e}")))?;
            let id: NodeId = id
                .parse()
                .map_err(|e| bad(format!("node id {id:?}: {e}")))?;
            if nodes.insert(addr, id).is_some() {
                return Err(bad(format!("{addr} is pinned twice")));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            nodes,
        })
    }

    /// The id remembered for `addr`.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<NodeId> {
        self.nodes.get(&addr).copied()
    }

    /// The file the pins live in.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Decides about the node at `addr` that proved `presented`; `explicit` when
    /// the user named it with `--node-id` (the transport has checked it already).
    pub(crate) fn decide(
        &self,
        addr: SocketAddr,
        presented: NodeId,
        explicit: bool,
    ) -> Result<Decision, PinError> {
        match self.get(addr) {
            None => Ok(Decision::Record),
            Some(remembered) if remembered == presented => Ok(Decision::Known),
            Some(previous) if explicit => Ok(Decision::Replace { previous }),
            Some(remembered) => Err(PinError::Mismatch {
                addr,
                remembered,
                presented,
                path: self.path.clone(),
            }),
        }
    }

    /// Remembers `id` for `addr` and writes the file.
    pub(crate) fn record(&mut self, addr: SocketAddr, id: NodeId) -> Result<(), PinError> {
        self.nodes.insert(addr, id);
        self.write()?;
        debug_assert_eq!(self.get(addr), Some(id));
        Ok(())
    }

    fn render(&self) -> String {
        let mut text = String::from(PINS_FILE_HEADER);
        for (addr, id) in &self.nodes {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{addr} {id}");
        }
        text
    }

    /// Writes the file atomically with mode 0600: under a temporary name in the
    /// same directory, synced, then renamed over the old one, so that a crash
    /// leaves either the old pins or the new ones, never a truncated file.
    fn write(&self) -> Result<(), PinError> {
        let path = &self.path;
        let write_error = |source| PinError::Write {
            path: path.clone(),
            source,
        };
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".nodes-")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(write_error)?;
        tmp.write_all(self.render().as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(write_error)?;
        tmp.persist(path).map_err(|e| write_error(e.error))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(byte: u8) -> NodeId {
        NodeId([byte; 32])
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn pins_file_sits_beside_the_identity_file() {
        assert_eq!(
            pins_path(Path::new("/home/a/alice.id")),
            Path::new("/home/a/alice.id.nodes")
        );
    }

    #[test]
    fn parses_lines_comments_and_ipv6_and_refuses_bad_lines() {
        let text = format!(
            "# comment\n\n127.0.0.1:7401 {}\n  [::1]:7402   {}  \n",
            id(1),
            id(2)
        );
        let pins = Pins::parse(Path::new("f"), &text).expect("parses");
        assert_eq!(pins.get(addr(7401)), Some(id(1)));
        assert_eq!(pins.get("[::1]:7402".parse().unwrap()), Some(id(2)));
        assert_eq!(pins.get(addr(7403)), None);

        for (bad, line) in [
            ("127.0.0.1:7401\n".to_string(), 1),
            (format!("x:1 {}\n", id(1)), 1),
            ("127.0.0.1:7401 abc\n".to_string(), 1),
            (format!("127.0.0.1:7401 {} extra\n", id(1)), 1),
            (
                format!("# c\n127.0.0.1:7401 {}\n127.0.0.1:7401 {}\n", id(1), id(2)),
                3,
            ),
        ] {
            match Pins::parse(Path::new("f"), &bad) {
                Err(PinError::Parse { line: got, .. }) => assert_eq!(got, line, "{bad:?}"),
                other => panic!("expected a parse error for {bad:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn records_atomically_with_mode_0600_and_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = pins_path(&dir.path().join("alice.id"));
        let mut pins = Pins::load(&path).expect("no file: no pins");
        assert_eq!(pins.get(addr(7401)), None);
        pins.record(addr(7401), id(1)).expect("record");
        pins.record(addr(7402), id(2)).expect("record");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Pins::load(&path).expect("load");
        assert_eq!(again.get(addr(7401)), Some(id(1)));
        assert_eq!(again.get(addr(7402)), Some(id(2)));
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temporary file is left behind"
        );
    }

    #[test]
    fn a_changed_id_is_refused_naming_address_ids_and_file() {
        let mut pins = Pins::parse(Path::new("/x/alice.id.nodes"), "").expect("empty");
        assert_eq!(
            pins.decide(addr(7401), id(1), false).unwrap(),
            Decision::Record
        );
        pins.nodes.insert(addr(7401), id(1));
        assert_eq!(
            pins.decide(addr(7401), id(1), false).unwrap(),
            Decision::Known
        );
        let err = pins.decide(addr(7401), id(2), false).unwrap_err();
        assert!(matches!(err, PinError::Mismatch { .. }), "{err:?}");
        let text = err.to_string();
        for part in [
            "127.0.0.1:7401".to_string(),
            id(1).to_string(),
            id(2).to_string(),
            "/x/alice.id.nodes".to_string(),
        ] {
            assert!(text.contains(&part), "{text:?} does not name {part}");
        }
        // Named explicitly with --node-id (and proved by the node): replaced.
        assert_eq!(
            pins.decide(addr(7401), id(2), true).unwrap(),
            Decision::Replace { previous: id(1) }
        );
    }

    #[test]
    fn an_unreadable_or_damaged_file_is_an_error_and_left_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("alice.id.nodes");
        fs::create_dir(&path).expect("a directory where the file should be");
        assert!(matches!(Pins::load(&path), Err(PinError::Read { .. })));
        fs::remove_dir(&path).expect("rmdir");

        fs::write(&path, "not a pin\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(Pins::load(&path), Err(PinError::Parse { .. })));
        assert_eq!(fs::read(&path).expect("read"), b"not a pin\n");

        fs::write(&path, format!("127.0.0.1:7401 {}\n", id(1))).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");
        match Pins::load(&path) {
            Err(PinError::Permissions { mode, .. }) => assert_eq!(mode, 0o666),
            other => panic!("expected a permissions error, got {other:?}"),
        }

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let big = vec![b'#'; PINS_FILE_BYTES_MAX as usize + 1];
        fs::write(&path, &big).expect("write");
        assert!(matches!(Pins::load(&path), Err(PinError::TooLarge { .. })));
    }
}
