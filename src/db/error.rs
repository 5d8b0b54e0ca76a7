//! What `gatehouse db` itself tells a client when it refuses something: one
//! type, with each case's SQLSTATE and severity decided here and nowhere
//! else. Errors the server raises are passed on as the server sent them.

use super::auth::AuthError;
use super::codec::{CodecError, Frame, error_response};

/// SQLSTATE codes gatehouse reports, by PostgreSQL's names.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    /// The server's class for refusals of gatehouse's own credentials.
    pub const CLASS_INVALID_AUTHORIZATION: &str = "28";
}

/// How bad an error is, as PostgreSQL says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DbError {
    /// A message the protocol does not allow, or one too large.
    #[error("{0}")]
    Protocol(#[from] CodecError),
    #[error("no user name in the startup packet")]
    NoUser,
    /// Unknown user, wrong password, peer not trusted: the client learns
    /// nothing more (the reason goes to the server's log).
    #[error("password authentication failed for user \"{user}\"")]
    AuthenticationFailed { user: String },
    /// A malformed authentication exchange.
    #[error("{0}")]
    Authentication(#[from] AuthError),
    #[error("database \"{0}\" does not exist")]
    DatabaseNotListed(String),
    #[error("login timeout")]
    LoginTimeout,
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("no server connection free in pool {pool} within {waited:?}")]
    PoolExhausted {
        pool: String,
        waited: std::time::Duration,
    },
    #[error("the database server could not be reached")]
    ServerUnreachable,
    /// The server refused the connection for the client's database (3D000
    /// and the like): passed on as the server said it.
    #[error("{message}")]
    Server { sqlstate: String, message: String },
    #[error("startup parameters: {0}")]
    StartupParameters(String),
    #[error("terminating connection due to administrator command")]
    AdminShutdown,
    #[error("prepared statement \"{0}\" already exists")]
    DuplicatePreparedStatement(String),
}

impl DbError {
    pub fn sqlstate(&self) -> &str {
        use sqlstate::*;
        match self {
            DbError::Protocol(CodecError::TooLarge { .. }) => PROGRAM_LIMIT_EXCEEDED,
            DbError::Protocol(_) | DbError::LoginTimeout | DbError::StartupParameters(_) => {
                PROTOCOL_VIOLATION
            }
            DbError::Authentication(AuthError::Failed(_)) => INVALID_PASSWORD,
            DbError::Authentication(_) => PROTOCOL_VIOLATION,
            DbError::NoUser => INVALID_AUTHORIZATION,
            DbError::AuthenticationFailed { .. } => INVALID_PASSWORD,
            DbError::DatabaseNotListed(_) => INVALID_CATALOG_NAME,
            DbError::TooManyClients | DbError::PoolExhausted { .. } => TOO_MANY_CONNECTIONS,
            DbError::ServerUnreachable => CONNECTION_FAILURE,
            DbError::Server { sqlstate, .. } => sqlstate,
            DbError::AdminShutdown => ADMIN_SHUTDOWN,
            DbError::DuplicatePreparedStatement(_) => DUPLICATE_PREPARED_STATEMENT,
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            DbError::DuplicatePreparedStatement(_) => Severity::Error,
            _ => Severity::Fatal,
        }
    }

    /// The ErrorResponse that tells the client.
    pub fn frame(&self) -> Frame {
        error_response(self.severity().as_str(), self.sqlstate(), &self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::{DbError, Severity};
    use crate::db::codec::CodecError;

    #[test]
    fn each_case_has_its_sqlstate_and_severity() {
        for (error, sqlstate, severity) in [
            (
                DbError::Protocol(CodecError::TooLarge { len: 9, max: 1 }),
                "54000",
                Severity::Fatal,
            ),
            (
                DbError::Protocol(CodecError::BadLength(3)),
                "08P01",
                Severity::Fatal,
            ),
            (DbError::TooManyClients, "53300", Severity::Fatal),
            (DbError::AdminShutdown, "57P01", Severity::Fatal),
            (
                DbError::DuplicatePreparedStatement("q".into()),
                "42P05",
                Severity::Error,
            ),
            (
                DbError::Server {
                    sqlstate: "3D000".into(),
                    message: "database \"x\" does not exist".into(),
                },
                "3D000",
                Severity::Fatal,
            ),
        ] {
            assert_eq!(error.sqlstate(), sqlstate, "{error}");
            assert_eq!(error.severity(), severity, "{error}");
            let frame = error.frame();
            let fields = frame.error_fields();
            assert!(fields.contains(&(b'C', sqlstate)), "{fields:?}");
            assert!(fields.contains(&(b'M', error.to_string().as_str())));
        }
    }
}
