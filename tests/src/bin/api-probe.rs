//! `api-probe TARGET METHOD PATH [--header "NAME: VALUE"]... [--body TEXT]`: one HTTP/1.1
//! request to the agent's local API over TCP (`127.0.0.1:PORT`) or a unix socket
//! (`unix:/PATH`). Prints the status code on the first line, then the raw answer body.
//! Exit code 0 when an answer came, 2 when the connection failed (the error on stderr).
//!
//! It uses neither threads nor a runtime, so a test can run it as another user
//! (`CommandExt::uid`) to see what that user gets from the API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(target), Some(method), Some(path)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: api-probe TARGET METHOD PATH [--header \"N: V\"]... [--body TEXT]");
        return ExitCode::from(64);
    };
    let mut headers = String::new();
    let mut body = String::new();
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--header", Some(h)) => {
                headers.push_str(&h);
                headers.push_str("\r\n");
            }
            ("--body", Some(b)) => body = b,
            _ => {
                eprintln!("api-probe: unexpected argument {flag:?}");
                return ExitCode::from(64);
            }
        }
    }
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = match exchange(&target, request.as_bytes()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("api-probe: {target}: {e}");
            return ExitCode::from(2);
        }
    };
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).unwrap_or("none");
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    println!("{status}\n{body}");
    ExitCode::SUCCESS
}

fn exchange(target: &str, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    if let Some(path) = target.strip_prefix("unix:") {
        let mut s = UnixStream::connect(path)?;
        s.write_all(request)?;
        s.read_to_end(&mut answer)?;
    } else {
        let mut s = TcpStream::connect(target)?;
        s.write_all(request)?;
        s.read_to_end(&mut answer)?;
    }
    Ok(answer)
}
