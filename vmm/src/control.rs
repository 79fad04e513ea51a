//! The control socket: JSON lines over a Unix socket, one request and one reply per line,
//! shaped like QMP (`{"execute": ..., "arguments": {...}}` → `{"return": ...}` or
//! `{"error": {"class": ..., "desc": ...}}`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use log::{debug, warn};
use proto::auth::Secret;
use proto::local::PeerAuth;
use proto::peercred::{self, AllowList};
use proto::MigrationParams;
use serde_json::{json, Value};

use crate::machine::Machine;
use crate::migration;

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// Binds the control socket at `path`, replacing a stale socket file. The file is `0600`, or
/// `0660` and owned by `group` when one is given.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    // The control socket can stop, migrate and quit the VM: its owner's (and the group's)
    // alone, whatever the umask. A client that got in anyway is checked by its credentials.
    peercred::restrict_socket(path, group).map_err(std::io::Error::other)?;
    Ok(l)
}

/// Serves control connections until the process exits; only clients on `allow` are served.
pub fn serve(listener: UnixListener, machine: Arc<Machine>, allow: AllowList) {
    let allow = Arc::new(allow);
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let m = machine.clone();
                let allow = allow.clone();
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || handle_client(c, m, &allow));
            }
            Err(e) => warn!("control socket accept: {e}"),
        }
    }
}

fn handle_client(conn: UnixStream, m: Arc<Machine>, allow: &AllowList) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let allowed =
        peercred::peer_of(&conn).and_then(|peer| allow.check(&peer, "this VM's control socket"));
    if let Err(e) = allowed {
        warn!("refusing a control client: {e}");
        let _ = send_line(&mut out, &error_reply(&e.to_string()));
        linger(&conn);
        return;
    }
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match std::io::Read::take(&mut reader, MAX_LINE as u64).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() >= MAX_LINE {
            let _ = send_line(&mut out, &error_reply("request line too long"));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        debug!("control: {}", line.trim());
        let (reply, quit) = match serde_json::from_str::<Value>(&line) {
            Ok(req) => execute(&m, &req),
            Err(e) => (error_reply(&format!("malformed JSON: {e}")), false),
        };
        if send_line(&mut out, &reply).is_err() {
            return;
        }
        if quit {
            let _ = out.flush();
            std::process::exit(0);
        }
    }
}

/// Writes `v` and a newline with one `write`. `writeln!` of a `Value` writes each token on its
/// own: a `query-migrate` reply took hundreds of system calls, each waking the client, on
/// the cores the migration it reports on uses.
pub fn send_line(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Waits briefly for a refused client's request before closing: closed at once, the client's
/// request would fail to send (EPIPE), and many clients report that instead of the reply that
/// says why.
fn linger(conn: &UnixStream) {
    let _ = conn.shutdown(std::net::Shutdown::Write);
    if conn
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .is_ok()
    {
        let mut sink = [0u8; 4096];
        let mut left = MAX_LINE;
        while left > 0 {
            match std::io::Read::read(&mut &*conn, &mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
}

fn error_reply(desc: &str) -> Value {
    json!({"error": {"class": "GenericError", "desc": desc}})
}

fn ok(v: Value) -> Value {
    json!({ "return": v })
}

/// Runs one request; returns the reply and whether the process should exit after sending it.
pub fn execute(m: &Arc<Machine>, req: &Value) -> (Value, bool) {
    let Some(cmd) = req.get("execute").and_then(Value::as_str) else {
        return (
            error_reply("request needs a string field \"execute\""),
            false,
        );
    };
    let args = req.get("arguments").cloned().unwrap_or(json!({}));
    if !args.is_object() {
        return (error_reply("\"arguments\" must be an object"), false);
    }
    let r = match cmd {
        "query-status" => {
            let status = m.status();
            Ok(json!({
                "status": status,
                "running": status == crate::machine::Status::Running,
                "vcpus": m.vm.vcpu_count(),
                "page_size": m.vm.ram().page_size(),
                "fault": m.vm.vcpu_control().fault(),
            }))
        }
        "stop" => m.stop().map(|_| json!({})),
        "cont" => m
            .cont(args.get("force").and_then(Value::as_bool).unwrap_or(false))
            .map(|_| json!({})),
        "quit" => return (ok(json!({})), true),
        "migrate" => migrate(m, &args),
        "migrate-incoming" => migrate_incoming(m, &args),
        "migrate-cancel" => migration::cancel(m)
            .map(|_| json!({}))
            .map_err(|e| e.to_string()),
        "migrate-set-parameters" => {
            let current = m.state().params;
            merge_params(current, &args).and_then(|p| {
                migration::set_params(m, p)
                    .map(|_| json!({}))
                    .map_err(|e| e.to_string())
            })
        }
        "query-migrate-parameters" => {
            serde_json::to_value(m.state().params).map_err(|e| e.to_string())
        }
        "query-migrate" => {
            let s = m.state();
            serde_json::to_value(&s.migration).map_err(|e| e.to_string())
        }
        "migrate-start-postcopy" => migration::start_postcopy(m)
            .map(|_| json!({}))
            .map_err(|e| e.to_string()),
        "migrate-pause" => migration::pause(m)
            .map(|_| json!({}))
            .map_err(|e| e.to_string()),
        "migrate-resume" => uri_arg(&args, "migrate-resume").and_then(|uri| {
            migration::resume(m, &uri)
                .map(|_| json!({}))
                .map_err(|e| e.to_string())
        }),
        "migrate-recover" => uri_arg(&args, "migrate-recover").and_then(|uri| {
            migration::recover(m, &uri)
                .map(|_| json!({}))
                .map_err(|e| e.to_string())
        }),
        "query-ram-digest" => ram_digest(m, &args),
        other => Err(format!("unknown command \"{other}\"")),
    };
    match r {
        Ok(v) => (ok(v), false),
        Err(e) => (error_reply(&e), false),
    }
}

/// Applies the fields present in `args` on top of `base`, refusing unknown fields.
fn merge_params(base: MigrationParams, args: &Value) -> Result<MigrationParams, String> {
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    let (Some(obj), Some(a)) = (v.as_object_mut(), args.as_object()) else {
        return Err("parameters must be an object".into());
    };
    for (k, val) in a {
        if ["uri", "secret", "secret_file", "insecure", "tls_creds"].contains(&k.as_str()) {
            continue;
        }
        if !obj.contains_key(k) {
            return Err(format!("unknown migration parameter \"{k}\""));
        }
        obj.insert(k.clone(), val.clone());
    }
    serde_json::from_value(v).map_err(|e| format!("bad migration parameter: {e}"))
}

/// SHA-256 per RAM block; `exclude` (`[[address, length], ...]`) leaves guest ranges out.
fn ram_digest(m: &Machine, args: &Value) -> Result<Value, String> {
    let mut exclude = Vec::new();
    if let Some(list) = args.get("exclude") {
        let bad = || "\"exclude\" must be a list of [address, length] pairs".to_string();
        for pair in list.as_array().ok_or_else(bad)? {
            match pair.as_array().map(|p| (p.len(), p)) {
                Some((2, p)) => exclude.push((
                    p[0].as_u64().ok_or_else(bad)?,
                    p[1].as_u64().ok_or_else(bad)?,
                )),
                _ => return Err(bad()),
            }
        }
    }
    // Not under the state lock: while a userfaultfd covers RAM the hash waits for pages, and
    // the migration thread needs the lock to finish. Without a page server nothing would bring
    // a missing page, and the request would never be answered.
    let skip_holes = {
        let s = m.state();
        if s.status == crate::machine::Status::PostcopyPaused
            || (s.migration.phase == proto::Phase::PostcopyPaused && s.uffd.is_some())
        {
            return Err(
                "pages of this VM are still missing and its page server is out of reach (postcopy-paused): a RAM digest would wait for them"
                    .into(),
            );
        }
        // Before the VM ran here a hole is a page that has not arrived: zeros so far, and
        // nothing would serve a read of it through the userfaultfd yet.
        s.uffd.is_none()
            || matches!(
                s.status,
                crate::machine::Status::Inmigrate | crate::machine::Status::MigrateFailed
            )
    };
    let blocks: Vec<Value> =
        m.vm.ram()
            .digests_excluding(&exclude, skip_holes)
            .into_iter()
            .map(|(name, sha256)| json!({"name": name, "sha256": sha256}))
            .collect();
    Ok(json!({ "blocks": blocks }))
}

/// The `uri` argument of `cmd`: `tcp:HOST:PORT` or `unix:PATH`.
fn uri_arg(args: &Value, cmd: &str) -> Result<String, String> {
    let uri = args
        .get("uri")
        .and_then(Value::as_str)
        .ok_or(format!("{cmd} needs a string argument \"uri\""))?
        .to_string();
    if !uri.starts_with("tcp:") && !uri.starts_with("unix:") {
        return Err(format!(
            "unsupported migration uri \"{uri}\" (expected tcp:HOST:PORT or unix:PATH)"
        ));
    }
    Ok(uri)
}

fn migrate(m: &Arc<Machine>, args: &Value) -> Result<Value, String> {
    let uri = uri_arg(args, "migrate")?;
    let auth = peer_auth(args)?;
    let current = m.state().params;
    let params = merge_params(current, args)?;
    m.state().params = params;
    migration::start_outgoing(m, uri, auth)
        .map(|_| json!({}))
        .map_err(|e| e.to_string())
}

/// `migrate-incoming`: where a VMM started with `--incoming defer` listens, and with which
/// secret; once.
fn migrate_incoming(m: &Arc<Machine>, args: &Value) -> Result<Value, String> {
    let uri = uri_arg(args, "migrate-incoming")?;
    let auth = peer_auth(args)?;
    let autostart = m.state().deferred_incoming.take().ok_or(
        "migrate-incoming applies once, to a VMM started with --incoming defer".to_string(),
    )?;
    migration::start_incoming(m, uri, auth, autostart)
        .map(|_| json!({}))
        .map_err(|e| {
            // Nothing listens: the operator may try again.
            m.state().deferred_incoming = Some(autostart);
            e.to_string()
        })
}

/// How the migration's peers authenticate: `secret` (the text itself) or `secret_file` (a
/// file only its owner can read; its trailing newline is not part of the secret),
/// `tls_creds` (a directory of certificates and keys that umemd reads: TLS on every TCP
/// connection), and `insecure`, which allows a non-loopback address without a secret or TLS.
pub fn peer_auth(args: &Value) -> Result<PeerAuth, String> {
    let text = |key: &str| -> Result<Option<&str>, String> {
        match args.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or(format!("\"{key}\" must be a string")),
        }
    };
    if text("secret")?.is_some() && text("secret_file")?.is_some() {
        return Err("give \"secret\" or \"secret_file\", not both".into());
    }
    let insecure = match args.get("insecure") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or("\"insecure\" must be true or false".to_string())?,
    };
    build_peer_auth(
        text("secret")?,
        text("secret_file")?.map(std::path::Path::new),
        text("tls_creds")?,
        insecure,
    )
}

/// The [`PeerAuth`] of a migration, from the control API's arguments or the command line:
/// the secret (its text, or a file only its owner can read), the TLS credentials directory
/// (made absolute), and `insecure`.
pub fn build_peer_auth(
    secret: Option<&str>,
    secret_file: Option<&std::path::Path>,
    tls_creds: Option<&str>,
    insecure: bool,
) -> Result<PeerAuth, String> {
    let secret = match (secret, secret_file) {
        (Some(s), _) => Some(Secret::new(s.as_bytes().to_vec()).map_err(|e| e.to_string())?),
        (None, Some(f)) => Some(Secret::from_file(f).map_err(|e| e.to_string())?),
        (None, None) => None,
    };
    let tls_creds = match tls_creds {
        Some("") => return Err("\"tls_creds\" must name a directory".into()),
        Some(dir) => Some(absolute(dir)?),
        None => None,
    };
    Ok(PeerAuth {
        secret,
        insecure,
        tls_creds,
    })
}

/// umemd reads the directory from its own working directory: a relative path is made absolute
/// here, where the operator meant it.
fn absolute(dir: &str) -> Result<String, String> {
    std::path::absolute(dir)
        .map(|p| p.display().to_string())
        .map_err(|e| format!("\"tls_creds\": {dir}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the `write` calls made on it.
    #[derive(Default)]
    struct Writes {
        calls: usize,
        bytes: Vec<u8>,
    }

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_reply_is_one_write_of_one_line() {
        let stats: serde_json::Map<String, Value> = (0..40)
            .map(|i| (format!("field_{i}"), json!([i, i * 2])))
            .collect();
        let reply = ok(json!({"phase": "postcopy", "stats": stats}));
        let mut w = Writes::default();
        send_line(&mut w, &reply).unwrap();
        assert_eq!(w.calls, 1);
        assert_eq!(w.bytes.last(), Some(&b'\n'));
        assert_eq!(w.bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Value = serde_json::from_slice(&w.bytes).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn peer_auth_takes_a_secret_or_a_file_never_both() {
        assert_eq!(peer_auth(&json!({})).unwrap(), PeerAuth::default());
        let a = peer_auth(&json!({"secret": "0123456789abcdef", "insecure": true})).unwrap();
        assert_eq!(a.secret.unwrap().as_bytes(), b"0123456789abcdef");
        assert!(a.insecure);
        assert!(peer_auth(&json!({"secret": "short"}))
            .unwrap_err()
            .contains("at least 16"));
        assert!(peer_auth(&json!({"secret": "0123456789abcdef", "secret_file": "/x"})).is_err());
        assert!(peer_auth(&json!({"secret_file": "/nonexistent/key"})).is_err());
        assert!(peer_auth(&json!({"insecure": "yes"})).is_err());
        let t = peer_auth(&json!({"tls_creds": "/etc/umem/tls"})).unwrap();
        assert_eq!(t.tls_creds.as_deref(), Some("/etc/umem/tls"));
        assert!(peer_auth(&json!({"tls_creds": "relative"}))
            .unwrap()
            .tls_creds
            .is_some_and(|d| d.starts_with('/') && d.ends_with("/relative")));
        assert!(peer_auth(&json!({"tls_creds": ""})).is_err());
        assert!(peer_auth(&json!({"tls_creds": 1})).is_err());
        // The secret is no migration parameter: it is never stored with them, nor shown.
        let p = merge_params(
            MigrationParams::default(),
            &json!({"secret": "0123456789abcdef", "secret_file": "/x", "insecure": true,
                    "tls_creds": "/etc/umem/tls"}),
        )
        .unwrap();
        assert_eq!(p, MigrationParams::default());
    }

    #[test]
    fn params_merge_and_refuse_unknown() {
        let p = merge_params(
            MigrationParams::default(),
            &json!({"downtime_limit_ms": 20, "mode": "hybrid"}),
        )
        .unwrap();
        assert_eq!(p.downtime_limit_ms, 20);
        assert_eq!(p.mode, proto::MigrationMode::Hybrid);
        assert!(merge_params(p, &json!({"bogus": 1})).is_err());
        assert!(merge_params(p, &json!({"max_rounds": "x"})).is_err());
    }

    #[test]
    fn time_limits_and_the_postcopy_bandwidth_are_parameters() {
        let p = merge_params(
            MigrationParams::default(),
            &json!({"postcopy_bandwidth_limit": 8388608, "precopy_timeout_ms": 3000,
                    "precopy_timeout_action": "postcopy", "completion_timeout_per_gib_s": 150}),
        )
        .unwrap();
        assert_eq!(p.postcopy_bandwidth_limit, 8 << 20);
        assert_eq!(p.precopy_timeout_ms, 3000);
        assert_eq!(p.precopy_timeout_action, proto::TimeoutAction::Postcopy);
        assert_eq!(p.completion_timeout_per_gib_s, 150);
        let e = merge_params(p, &json!({"precopy_timeout_action": "resume"})).unwrap_err();
        assert!(e.contains("resume"), "{e}");
    }
}
