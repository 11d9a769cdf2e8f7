//! volume-central: the central side on PostgreSQL.
