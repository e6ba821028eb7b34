//! The migrations are embedded by `sqlx::migrate!`: rebuild when one is added or changed
//! (cargo does not track that directory otherwise).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
