//! The README's examples are what users copy first: they must work.

use hearth_engine::schema::{MergePolicy, OnDelete};
use hearth_engine::Schema;

/// The first ```toml block after `heading`.
fn toml_block(heading: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find(heading).expect("heading in README")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + section[start..].find("```").expect("block end");
    section[start..end].to_string()
}

#[test]
fn the_schema_example_is_a_valid_schema_with_the_policies_it_shows() {
    let schema = Schema::parse(&toml_block("## The schema")).unwrap();
    let cards = schema.table("cards").unwrap();
    let policy = |c: &str| cards.columns[cards.column_index(c).unwrap()].policy;
    assert_eq!(policy("likes"), MergePolicy::Counter);
    assert_eq!(policy("stock"), MergePolicy::Counter);
    assert_eq!(policy("tags"), MergePolicy::Set);
    assert_eq!(policy("body"), MergePolicy::Text);
    assert_eq!(policy("price"), MergePolicy::Manual);
    assert_eq!(policy("title"), MergePolicy::Lww);
    assert_eq!(cards.on_delete, OnDelete::DeleteWins);
    assert!(schema.table("hearth_conflicts").is_some());
}

#[test]
fn the_streams_example_declares_the_streams_it_shows() {
    let tables = r#"version = 1
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, owner TEXT, done INTEGER NOT NULL DEFAULT 0)"
"#;
    let source = format!(
        "{tables}\n{}",
        toml_block("## Selective sync: streams and subscriptions")
    );
    let schema = Schema::parse(&source).unwrap();
    assert!(schema.streamed("todos"));
    let list = &schema.streams["list_todos"];
    assert_eq!(list.table, "todos");
    assert_eq!(list.filter.key().map(|(_, p)| p), Some("list"));
    let open = &schema.streams["my_open"];
    assert_eq!(open.filter.key().map(|(_, p)| p), Some("me"));
    let params: Vec<&String> = open.filter.params().keys().collect();
    assert_eq!(params, ["me", "pinned"]);
}
