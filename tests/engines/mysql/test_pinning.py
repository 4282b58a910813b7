"""What a MySQL/MariaDB query text leaves on its server connection, and whether it pins.

The tables are the specification: one text per row with the Verdict it must get. In replay
mode (the default) SET and other variable assignments are state the proxy carries (system
variables, user variables, the schema, the last insert id); what it cannot carry pins, with a
reason. Pin mode pins on variables too, unless EXCLUDE_VARIABLE_SETS lets them through.
Keywords inside strings, comments and quoted identifiers never count; the content of
executable comments does. Text the lexer cannot follow is UNCLASSIFIED.
"""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmux.engines.mysql import pinning
from dbmux.engines.mysql.lexer import Unterminated, split_statements
from dbmux.engines.mysql.pinning import (
    FOUND_ROWS,
    GLOBAL_READ_LOCK,
    HANDLER,
    LOCK_TABLES,
    MAX_STATEMENT_SIZE,
    NO_STATE,
    PREPARED_STATEMENT,
    SET_ROLE,
    SET_TRANSACTION,
    SET_VARIABLE,
    STATEMENT_SIZE,
    TEMPORARY_TABLE,
    UNCLASSIFIED,
    USER_LOCK,
    XA_TRANSACTION,
    Classifier,
    Verdict,
    might_matter,
)


def pin(reason: str) -> Verdict:
    return Verdict(reason=reason)


def system(*names: str) -> Verdict:
    return Verdict(system_vars=frozenset(names))


def user(*names: str) -> Verdict:
    return Verdict(user_vars=frozenset(names))


def verdict(
    *,
    reason: str | None = None,
    system: tuple[str, ...] = (),
    user: tuple[str, ...] = (),
    schema: bool = False,
    last_insert_id: bool = False,
) -> Verdict:
    return Verdict(reason, frozenset(system), frozenset(user), schema, last_insert_id)


CHARSET = (
    "character_set_client",
    "character_set_connection",
    "character_set_results",
    "collation_connection",
)
SCHEMA = Verdict(schema=True)
READS_INSERT_ID = Verdict(last_insert_id=True)


SPEC: list[tuple[str, Verdict]] = [
    # --- plain application queries leave nothing
    ("SELECT id, name FROM users WHERE id = 42", NO_STATE),
    ("SELECT 1", NO_STATE),
    ("INSERT INTO orders (user_id, total) VALUES (42, 19.99)", NO_STATE),
    ("UPDATE accounts SET balance = balance - 1 WHERE id = 1", NO_STATE),
    ("DELETE FROM sessions WHERE expires_at < NOW()", NO_STATE),
    ("REPLACE INTO kv (k, v) VALUES ('a', 'b')", NO_STATE),
    ("INSERT INTO t (a) VALUES (1) ON DUPLICATE KEY UPDATE a = VALUES(a) + 1", NO_STATE),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE", NO_STATE),
    ("SELECT * FROM t LOCK IN SHARE MODE", NO_STATE),
    ("WITH recent AS (SELECT * FROM orders) SELECT COUNT(*) FROM recent", NO_STATE),
    ("SHOW VARIABLES LIKE 'sql_mode'", NO_STATE),
    ("SHOW CREATE PROCEDURE p", NO_STATE),
    ("EXPLAIN SELECT * FROM t", NO_STATE),
    ("DESCRIBE users", NO_STATE),
    ("GRANT SELECT ON shop.* TO 'app'@'%'", NO_STATE),
    ("CREATE USER 'bob'@'localhost' IDENTIFIED BY 'secret'", NO_STATE),
    ("KILL QUERY 42", NO_STATE),
    ("ANALYZE TABLE t", NO_STATE),
    ("CREATE TABLE t (id INT PRIMARY KEY, temporary_flag BOOL)", NO_STATE),
    ("ALTER TABLE t ADD COLUMN c INT DEFAULT 0", NO_STATE),
    ("DROP TABLE IF EXISTS t", NO_STATE),
    ("TRUNCATE TABLE t", NO_STATE),
    ("SELECT 1 INTO OUTFILE '/tmp/out'", NO_STATE),
    # Reading a variable is not assigning it.
    ("SELECT @x", NO_STATE),
    ("SELECT @x = 1, @y FROM t", NO_STATE),
    ("SELECT @@version, @@session.sql_mode", NO_STATE),
    ("SELECT * FROM t WHERE email = 'bob@example.com'", NO_STATE),
    ("INSERT INTO t VALUES (@x)", NO_STATE),
    # --- transaction control: the proxy watches the server's in-transaction flag
    ("BEGIN", NO_STATE),
    ("BEGIN WORK", NO_STATE),
    ("begin;", NO_STATE),
    ("START TRANSACTION", NO_STATE),
    ("START TRANSACTION READ ONLY", NO_STATE),
    ("START TRANSACTION WITH CONSISTENT SNAPSHOT", NO_STATE),
    ("COMMIT", NO_STATE),
    ("COMMIT AND CHAIN", NO_STATE),
    ("ROLLBACK", NO_STATE),
    ("SAVEPOINT s1", NO_STATE),
    ("ROLLBACK TO SAVEPOINT s1", NO_STATE),
    ("RELEASE SAVEPOINT s1", NO_STATE),
    # --- SET of session system variables: replayed, named in lower case
    ("SET sql_mode = 'STRICT_TRANS_TABLES'", system("sql_mode")),
    ("SET SESSION sql_mode = ''", system("sql_mode")),
    ("SET LOCAL time_zone = '+00:00'", system("time_zone")),
    ("SET @@time_zone = 'UTC'", system("time_zone")),
    ("SET @@session.wait_timeout = 60", system("wait_timeout")),
    ("SET @@SESSION.Sql_Mode = ''", system("sql_mode")),
    ("SET @@local.net_write_timeout = 120", system("net_write_timeout")),
    ("set autocommit=0", system("autocommit")),
    ("SET autocommit := 1", system("autocommit")),
    ("SET sql_mode = DEFAULT", system("sql_mode")),
    ("SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES')", system("sql_mode")),
    (
        "SET max_execution_time = 1000, sql_select_limit = 10",
        system("max_execution_time", "sql_select_limit"),
    ),
    ("SET `sql_mode` = ''", system("sql_mode")),
    ("SET @@session.`time_zone` = 'UTC'", system("time_zone")),
    ("SET transaction_isolation = 'READ-COMMITTED'", system("transaction_isolation")),
    ("SET character_set_results = NULL", system("character_set_results")),
    ("SET SQL_SAFE_UPDATES=1", system("sql_safe_updates")),
    ("SET keycache1.key_buffer_size = 1024", system("keycache1.key_buffer_size")),
    # --- SET of server-wide variables leaves nothing in the session
    ("SET GLOBAL max_connections = 500", NO_STATE),
    ("SET @@global.max_connections = 500", NO_STATE),
    ("SET PERSIST max_connections = 500", NO_STATE),
    ("SET PERSIST_ONLY back_log = 100", NO_STATE),
    ("SET @@persist.max_connections = 500", NO_STATE),
    # --- several assignments: GLOBAL/SESSION hold for what follows, @@scope. for one variable
    ("SET @a = 1, sql_mode = '', GLOBAL x = 2, y = 3", verdict(system=("sql_mode",), user=("a",))),
    ("SET GLOBAL x = 1, SESSION y = 2, z = 3", system("y", "z")),
    (
        "SET @@global.sort_buffer_size = 50000, sort_buffer_size = 1000000",
        system("sort_buffer_size"),
    ),
    ("SET GLOBAL a = 1, @@b = 2", system("b")),
    ("SET @x = 1, @@session.y = 2, @@global.z = 3", verdict(system=("y",), user=("x",))),
    (
        "SET @a = IF(1, 2, 3), @b = (SELECT COUNT(*) FROM t WHERE c IN (1, 2)), sql_mode = 'A,B'",
        verdict(system=("sql_mode",), user=("a", "b")),
    ),
    ("SET @a = ',', @b = 'x, y = 1'", user("a", "b")),
    ("SET NAMES utf8mb4, @a = 1", verdict(system=CHARSET, user=("a",))),
    ("SET @a = 1, CHARACTER SET utf8mb4", verdict(system=CHARSET, user=("a",))),
    # --- SET NAMES and SET CHARACTER SET change four variables
    ("SET NAMES utf8mb4", system(*CHARSET)),
    ("SET NAMES 'utf8mb4' COLLATE 'utf8mb4_unicode_ci'", system(*CHARSET)),
    ("SET NAMES DEFAULT", system(*CHARSET)),
    ("set names latin1", system(*CHARSET)),
    ("SET CHARACTER SET utf8mb4", system(*CHARSET)),
    ("SET CHARSET 'latin1'", system(*CHARSET)),
    ("SET CHARACTER SET DEFAULT", system(*CHARSET)),
    # --- user variables: case-insensitive names, any quoting, assigned anywhere
    ("SET @x = 1", user("x")),
    ("SET @x := 1", user("x")),
    ("SET @X = 1", user("x")),
    ("SET @`my var` = 1", user("my var")),
    ("SET @'quoted' = 1", user("quoted")),
    ('SET @"Double" = 1', user("double")),
    ("SET @a.b$c = 1", user("a.b$c")),
    ("SET @a = 1, @b := 2", user("a", "b")),
    ("SELECT @n := @n + 1 AS rownum FROM t", user("n")),
    ("SELECT @n:=0", user("n")),
    ("SELECT @a, @b := @a", user("b")),
    ("SELECT * FROM t WHERE (@x := 1)", user("x")),
    ("UPDATE t SET c = (@v := c + 1) WHERE id = 1", user("v")),
    ("DO @x := 5", user("x")),
    ("SELECT id INTO @id FROM users LIMIT 1", user("id")),
    ("SELECT a, b FROM t LIMIT 1 INTO @a, @b", user("a", "b")),
    ("SELECT @`a``b` := 1", user("a`b")),
    ("SELECT @'a''b' := 1", user("a'b")),
    ("SELECT @'a\\'b' := 1", user("a'b")),
    # --- SET TRANSACTION: the next transaction only (pins); SESSION: replayed
    ("SET TRANSACTION ISOLATION LEVEL READ COMMITTED", pin(SET_TRANSACTION)),
    ("SET TRANSACTION READ ONLY", pin(SET_TRANSACTION)),
    ("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE", system("tx_isolation")),
    ("SET SESSION TRANSACTION READ WRITE", system("tx_read_only")),
    (
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        system("tx_isolation", "tx_read_only"),
    ),
    ("SET LOCAL TRANSACTION READ ONLY", system("tx_read_only")),
    ("SET GLOBAL TRANSACTION ISOLATION LEVEL READ COMMITTED", NO_STATE),
    # --- other SET statements
    ("SET PASSWORD = 'new'", NO_STATE),
    ("SET PASSWORD FOR 'bob'@'%' = 'new'", NO_STATE),
    ("SET DEFAULT ROLE ALL TO 'bob'@'%'", NO_STATE),
    ("SET ROLE reporting", pin(SET_ROLE)),
    ("SET ROLE NONE", pin(SET_ROLE)),
    ("SET ROLE DEFAULT", pin(SET_ROLE)),
    ("SET RESOURCE GROUP batch", pin(UNCLASSIFIED)),
    ("SET RESOURCE GROUP batch FOR 42, 43", NO_STATE),
    ("SET @a = GET_LOCK('job', 0)", verdict(reason=USER_LOCK, user=("a",))),
    ("SET @id = LAST_INSERT_ID()", verdict(user=("id",), last_insert_id=True)),
    # --- MariaDB's SET STATEMENT: per-statement variables; the statement after FOR counts
    ("SET STATEMENT max_statement_time = 1 FOR SELECT * FROM t", NO_STATE),
    ("SET STATEMENT sql_mode = '' FOR CREATE TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("SET STATEMENT sql_mode = '' FOR SELECT @x := 1", user("x")),
    ("SET STATEMENT a = 1, b = (SELECT 1 FOR UPDATE) FOR UPDATE t SET c = 1", NO_STATE),
    ("SET STATEMENT max_statement_time = 1", pin(UNCLASSIFIED)),
    # --- SET statements the classifier cannot read
    ("SET", pin(UNCLASSIFIED)),
    ("SET sql_mode", pin(UNCLASSIFIED)),
    ("SET @a = 1,", pin(UNCLASSIFIED)),
    ("SET NAMES = 'utf8'", pin(UNCLASSIFIED)),
    ("SET 'sql_mode' = ''", pin(UNCLASSIFIED)),
    ("SET SESSION TRANSACTION", pin(UNCLASSIFIED)),
    # --- the current schema
    ("USE shop", SCHEMA),
    ("use `my db`", SCHEMA),
    # --- the last insert id: reading it is carried, setting it pins
    ("SELECT LAST_INSERT_ID()", READS_INSERT_ID),
    ("select last_insert_id ( )", READS_INSERT_ID),
    ("SELECT LAST_INSERT_ID/* c */()", READS_INSERT_ID),
    ("SELECT `last_insert_id`()", READS_INSERT_ID),
    ("SELECT @@identity", READS_INSERT_ID),
    ("SELECT @@last_insert_id", READS_INSERT_ID),
    ("SELECT @@session.identity", READS_INSERT_ID),
    ("INSERT INTO log (ref) VALUES (LAST_INSERT_ID())", READS_INSERT_ID),
    ("SELECT LAST_INSERT_ID(42)", pin(FOUND_ROWS)),
    ("UPDATE seq SET id = LAST_INSERT_ID(id + 1)", pin(FOUND_ROWS)),
    ("SELECT last_insert_id FROM audit", NO_STATE),
    ("SELECT app.last_insert_id()", NO_STATE),  # a stored function
    # --- row counts of the previous statement
    ("SELECT SQL_CALC_FOUND_ROWS * FROM t LIMIT 10", pin(FOUND_ROWS)),
    ("SELECT FOUND_ROWS()", pin(FOUND_ROWS)),
    ("SELECT ROW_COUNT()", pin(FOUND_ROWS)),
    ("select found_rows ()", pin(FOUND_ROWS)),
    ("SELECT found_rows FROM stats", NO_STATE),
    ("SELECT row_count, found_rows FROM stats", NO_STATE),
    ("SELECT stats.found_rows() FROM stats", NO_STATE),
    # --- user locks live as long as the session
    ("SELECT GET_LOCK('job', 10)", pin(USER_LOCK)),
    ("SELECT get_lock ('job', 10)", pin(USER_LOCK)),
    ("DO GET_LOCK('job', 0)", pin(USER_LOCK)),
    ("SELECT id FROM jobs WHERE GET_LOCK(CONCAT('job', id), 0) LIMIT 1", pin(USER_LOCK)),
    ("SELECT `get_lock`('job', 1)", pin(USER_LOCK)),
    ("SELECT service_get_write_locks('ns', 'lock1', 10)", pin(USER_LOCK)),
    ("SELECT RELEASE_LOCK('job')", NO_STATE),
    ("SELECT IS_FREE_LOCK('job'), IS_USED_LOCK('job')", NO_STATE),
    ("SELECT RELEASE_ALL_LOCKS()", NO_STATE),
    ("SELECT util.get_lock('job', 1)", NO_STATE),
    ("SELECT get_lock FROM t", NO_STATE),
    # --- temporary tables
    ("CREATE TEMPORARY TABLE t (id INT)", pin(TEMPORARY_TABLE)),
    ("create temporary table if not exists t like orders", pin(TEMPORARY_TABLE)),
    ("CREATE OR REPLACE TEMPORARY TABLE t AS SELECT 1", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY SEQUENCE s", pin(TEMPORARY_TABLE)),
    ("CREATE OR REPLACE TEMPORARY SEQUENCE s", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY SEQUENCE IF NOT EXISTS s START WITH 10", pin(TEMPORARY_TABLE)),
    ("CREATE /*!TEMPORARY*/ TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("CREATE /*M!100301 TEMPORARY*/ SEQUENCE s", pin(TEMPORARY_TABLE)),
    ("/*!CREATE*/ TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("/*M!CREATE TEMPORARY TABLE t (a INT)*/", pin(TEMPORARY_TABLE)),
    ("CREATE/**/TEMPORARY/**/TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("create\ntemporary\ttable t (a int)", pin(TEMPORARY_TABLE)),
    ("-- note\nCREATE TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("# note\nCREATE TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY TABLE IF NOT EXISTS t SELECT 1 AS a", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY TABLE t (a INT) SELECT 1 AS a UNION SELECT 2", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY TABLE t AS (SELECT 1 AS a)", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY TABLE t LIKE orders", pin(TEMPORARY_TABLE)),
    ("CREATE TEMPORARY TABLE `t` (a INT) ENGINE=MEMORY", pin(TEMPORARY_TABLE)),
    ("SELECT 1; CREATE TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("SELECT 'a\\'; CREATE TEMPORARY TABLE t (a INT); -- '", pin(TEMPORARY_TABLE)),
    ("EXECUTE IMMEDIATE 'CREATE TEMPORARY TABLE t (a INT)'", pin(PREPARED_STATEMENT)),
    ("CREATE TEMPORARY TABLE t SELECT @n := 1 AS n", verdict(reason=TEMPORARY_TABLE, user=("n",))),
    ("DROP TEMPORARY TABLE t", NO_STATE),
    ("DROP TEMPORARY TABLE IF EXISTS t", NO_STATE),
    ("CREATE TABLE temporary_results (id INT)", NO_STATE),
    ("CREATE TABLE t AS SELECT GET_LOCK('x', 1)", pin(USER_LOCK)),
    # --- table and instance locks
    ("LOCK TABLES t READ", pin(LOCK_TABLES)),
    ("LOCK TABLE t1 WRITE, t2 READ LOCAL", pin(LOCK_TABLES)),
    ("lock tables t write wait 5", pin(LOCK_TABLES)),
    ("UNLOCK TABLES", NO_STATE),
    ("LOCK INSTANCE FOR BACKUP", pin(GLOBAL_READ_LOCK)),
    ("UNLOCK INSTANCE", NO_STATE),
    ("LOCK something", pin(UNCLASSIFIED)),
    ("FLUSH TABLES WITH READ LOCK", pin(GLOBAL_READ_LOCK)),
    ("FLUSH TABLES t1, t2 WITH READ LOCK", pin(GLOBAL_READ_LOCK)),
    ("FLUSH TABLE t FOR EXPORT", pin(GLOBAL_READ_LOCK)),
    ("FLUSH TABLES t FOR EXPORT", pin(GLOBAL_READ_LOCK)),
    ("FLUSH NO_WRITE_TO_BINLOG TABLES WITH READ LOCK", pin(GLOBAL_READ_LOCK)),
    ("FLUSH LOCAL TABLES t WITH READ LOCK", pin(GLOBAL_READ_LOCK)),
    ("FLUSH TABLES", NO_STATE),
    ("FLUSH TABLES t1, t2", NO_STATE),
    ("FLUSH PRIVILEGES", NO_STATE),
    ("FLUSH LOGS", NO_STATE),
    ("BACKUP LOCK shop.t", pin(LOCK_TABLES)),
    ("BACKUP UNLOCK", NO_STATE),
    ("BACKUP STAGE START", pin(GLOBAL_READ_LOCK)),
    ("BACKUP STAGE END", NO_STATE),
    # --- prepared statements in SQL
    ("PREPARE s FROM 'SELECT ?'", pin(PREPARED_STATEMENT)),
    ("PREPARE s FROM @sql", pin(PREPARED_STATEMENT)),
    ("EXECUTE s USING @a", pin(PREPARED_STATEMENT)),
    ("EXECUTE IMMEDIATE 'SELECT 1'", pin(PREPARED_STATEMENT)),
    ("DEALLOCATE PREPARE s", pin(PREPARED_STATEMENT)),
    ("DROP PREPARE s", pin(PREPARED_STATEMENT)),
    # --- HANDLER and XA
    ("HANDLER t OPEN", pin(HANDLER)),
    ("HANDLER t READ FIRST", pin(HANDLER)),
    ("HANDLER t CLOSE", pin(HANDLER)),
    ("XA START 'tx1'", pin(XA_TRANSACTION)),
    ("XA BEGIN 'tx1'", pin(XA_TRANSACTION)),
    ("XA END 'tx1'", pin(XA_TRANSACTION)),
    ("XA PREPARE 'tx1'", pin(XA_TRANSACTION)),
    ("XA COMMIT 'tx1'", pin(XA_TRANSACTION)),
    ("XA ROLLBACK 'tx1'", pin(XA_TRANSACTION)),
    ("XA RECOVER", pin(XA_TRANSACTION)),
    # --- CALL does not pin; user variables passed whole may be OUT parameters
    ("CALL refresh_stats()", NO_STATE),
    ("CALL p(1, 'a')", NO_STATE),
    ("CALL next_id('orders', @id)", user("id")),
    ("CALL p(@in + 1, @out)", user("out")),
    ("CALL p(GET_LOCK('x', 1))", pin(USER_LOCK)),
    # --- LOAD DATA and GET DIAGNOSTICS assign user variables too
    ("LOAD DATA INFILE '/tmp/f' INTO TABLE t (a, @skip, c) SET b = 1", user("skip")),
    ("LOAD DATA LOCAL INFILE 'f.csv' INTO TABLE t", NO_STATE),
    ("GET DIAGNOSTICS @n = NUMBER, @rows = ROW_COUNT", user("n", "rows")),
    ("GET DIAGNOSTICS CONDITION 1 @msg = MESSAGE_TEXT", user("msg")),
    # --- stored programs: their bodies do not run now
    (
        "CREATE PROCEDURE p() BEGIN SET @x = 1; SET sql_mode = ''; SELECT GET_LOCK('a', 1); END",
        NO_STATE,
    ),
    ("CREATE DEFINER = 'admin'@'%' PROCEDURE p() BEGIN DECLARE n INT; SET n = 1; END", NO_STATE),
    (
        "CREATE DEFINER=CURRENT_USER() FUNCTION f() RETURNS INT DETERMINISTIC"
        " BEGIN RETURN LAST_INSERT_ID(); END",
        NO_STATE,
    ),
    (
        "CREATE OR REPLACE DEFINER = admin@localhost TRIGGER trg BEFORE INSERT ON t"
        " FOR EACH ROW BEGIN SET NEW.c = 1; END",
        NO_STATE,
    ),
    ("CREATE FUNCTION f() RETURNS INT RETURN FOUND_ROWS()", NO_STATE),
    ("CREATE EVENT e ON SCHEDULE EVERY 1 DAY DO BEGIN SET @x = 1; DELETE FROM log; END", NO_STATE),
    (
        "CREATE AGGREGATE FUNCTION agg(x INT) RETURNS INT BEGIN DECLARE CONTINUE HANDLER FOR"
        " NOT FOUND RETURN 0; LOOP FETCH GROUP NEXT ROW; END LOOP; END",
        NO_STATE,
    ),
    ("CREATE PACKAGE pkg AS PROCEDURE p1; FUNCTION f1 RETURN INT; END", NO_STATE),
    ("ALTER EVENT e DO SET @x = 1", NO_STATE),
    ("CREATE VIEW v AS SELECT LAST_INSERT_ID(), GET_LOCK('a', 1)", NO_STATE),
    (
        "CREATE ALGORITHM = MERGE DEFINER = CURRENT_USER SQL SECURITY INVOKER VIEW v"
        " AS SELECT FOUND_ROWS()",
        NO_STATE,
    ),
    # A body that is one statement ends at the first semicolon: what follows runs now.
    ("CREATE PROCEDURE p() SET @x = 1; SET @y = 2", user("y")),
    (
        "CREATE TRIGGER trg BEFORE INSERT ON t FOR EACH ROW SET NEW.created = NOW(); SET @z = 1",
        user("z"),
    ),
    ("CREATE PROCEDURE IF NOT EXISTS p() SELECT 1; SET @after = 1", user("after")),
    ("CREATE FUNCTION udf RETURNS STRING SONAME 'udf.so'; USE shop", SCHEMA),
    # --- compound statements at top level (MariaDB): code the lexer does not follow
    ("BEGIN NOT ATOMIC SET @x = 1; END", pin(UNCLASSIFIED)),
    ("begin not atomic declare x int; end", pin(UNCLASSIFIED)),
    ("lbl: BEGIN NOT ATOMIC SELECT 1; END lbl", pin(UNCLASSIFIED)),
    ("IF 1 THEN SET @x = 1; END IF", pin(UNCLASSIFIED)),
    ("WHILE @i < 3 DO SET @i = @i + 1; END WHILE", pin(UNCLASSIFIED)),
    ("REPEAT SET @i = @i + 1; UNTIL @i > 3 END REPEAT", pin(UNCLASSIFIED)),
    ("loop_1: LOOP SELECT 1; END LOOP", pin(UNCLASSIFIED)),
    ("`my label` : LOOP SELECT 1; END LOOP", pin(UNCLASSIFIED)),
    ("CASE @x WHEN 1 THEN SELECT 1; END CASE", pin(UNCLASSIFIED)),
    ("FOR i IN 1..3 DO SELECT i; END FOR", pin(UNCLASSIFIED)),
    ("DECLARE x INT", pin(UNCLASSIFIED)),
    ("BEGIN SELECT 1; END", pin(UNCLASSIFIED)),
    ("BEGIN --WORK", pin(UNCLASSIFIED)),  # not a comment: BEGIN - - WORK
    ("BEGIN -- WORK\n", NO_STATE),
    ("SELECT 1; BEGIN NOT ATOMIC SELECT 2; END; SET @after = 1", pin(UNCLASSIFIED)),
    # --- several statements in one text: the union, the first pin reason wins
    (
        "SET NAMES utf8mb4; SET autocommit = 1; SET sql_mode = 'TRADITIONAL'",
        system(*CHARSET, "autocommit", "sql_mode"),
    ),
    ("SELECT 1; SET @x = 1", user("x")),
    ("SET @x = 1; LOCK TABLES t READ; SET @y = 2", verdict(reason=LOCK_TABLES, user=("x", "y"))),
    ("LOCK TABLES t READ; CREATE TEMPORARY TABLE tt (a INT)", pin(LOCK_TABLES)),
    ("CREATE TEMPORARY TABLE tt (a INT); LOCK TABLES t READ", pin(TEMPORARY_TABLE)),
    (
        "USE shop; SET time_zone = '+00:00'; SELECT LAST_INSERT_ID()",
        verdict(system=("time_zone",), schema=True, last_insert_id=True),
    ),
    ("USE shop; SELECT 1", SCHEMA),
    ("SELECT 1;SET@x=1", user("x")),
    (";;SET @x = 1;;", user("x")),
    ("SELECT 1; SELECT 2;", NO_STATE),
    ("UPDATE t SET a = 1; UPDATE t SET b = 2", NO_STATE),
    ("INSERT INTO t VALUES (1); SELECT LAST_INSERT_ID()", READS_INSERT_ID),
    ("SELECT 1;\n -- note\n /* c */ # c\n USE shop", SCHEMA),
    ("LOCK TABLES t READ; SELECT 'open", pin(LOCK_TABLES)),
    # --- comments hide code
    ("-- SET @x = 1\nSELECT 1", NO_STATE),
    ("# SET @x = 1\nSELECT 1", NO_STATE),
    ("/* SET @x = 1 */ SELECT 1", NO_STATE),
    ("SELECT 1 /* ; SET @x = 1 */", NO_STATE),
    ("SELECT 1 -- ; SET @x = 1", NO_STATE),
    ("SELECT 1 --\t; SET @x = 1", NO_STATE),
    ("SELECT 1 # ; SET @x = 1", NO_STATE),
    ("SELECT 1 /* GET_LOCK('a', 1) */", NO_STATE),
    ("SELECT /*+ SET_VAR(sql_mode = '') */ 1", NO_STATE),  # an optimizer hint
    ("/* note */ SET @x = 1", user("x")),
    ("-- note\nSET @x = 1", user("x")),
    ("#note\nUSE shop", SCHEMA),
    # `--` starts a comment only before a blank: 1--1 is 1 - (-1).
    ("SELECT 1--1; SET @x = 1", user("x")),
    # Comments do not nest: the first */ ends this one.
    ("SELECT 1 /* a /* b */, @x := 1", user("x")),
    ("SET @x = 1 /* unterminated", pin(UNCLASSIFIED)),
    # --- executable comments are code
    ("/*!40101 SET NAMES utf8mb4 */", system(*CHARSET)),
    ("/*! SET @x = 1 */", user("x")),
    ("/*!50003 CREATE TEMPORARY TABLE t (a INT) */", pin(TEMPORARY_TABLE)),
    ("/*M!100400 SET @x = 1 */", user("x")),
    ("/*M! SET sql_mode = '' */", system("sql_mode")),
    ("SELECT /*! SQL_CALC_FOUND_ROWS */ * FROM t", pin(FOUND_ROWS)),
    ("SELECT 1 /*!, GET_LOCK('a', 1) */", pin(USER_LOCK)),
    (
        "/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;\n"
        "/*!40101 SET NAMES utf8mb4 */;",
        verdict(system=CHARSET, user=("old_character_set_client",)),
    ),
    ("SELECT 1 /*!50000 ; SET @x = 1 */", user("x")),
    ("SELECT /*!*/ @a := 2*/* c */3", user("a")),
    ("/*!40101 SET @x = 1", pin(UNCLASSIFIED)),
    # --- quoting hides code
    ("SELECT 'SET @x = 1'", NO_STATE),
    ("SELECT '; SET @x = 1'", NO_STATE),
    ("SELECT 'it''s; SET @x = 1'", NO_STATE),
    ("SELECT 'a\\'; SET @x = 1'", NO_STATE),
    ("SELECT 'a\\\\'; SET @x = 1", user("x")),  # 'a\\' ends after the escaped backslash
    ('SELECT "; SET @x = 1"', NO_STATE),
    ('SELECT "a""b; SET @x = 1"', NO_STATE),
    ("SELECT `; SET @x = 1`", NO_STATE),
    ("SELECT `a``b; SET @x = 1` FROM t", NO_STATE),
    ("SELECT `get_lock` FROM t", NO_STATE),
    ("SELECT 'GET_LOCK(1)', \"found_rows()\"", NO_STATE),
    ("SELECT _utf8mb4'SET @x = 1' COLLATE utf8mb4_bin", NO_STATE),
    ("SELECT X'3b', b'01', N'; SET @x = 1'", NO_STATE),
    ("SELECT 'a' '; SET @x := 1'", NO_STATE),
    ("SELECT identity FROM t WHERE email LIKE '%@x.com'", NO_STATE),
    ("SELECT '12:00:00', 'a:b'", NO_STATE),
    # --- a backslash: what NO_BACKSLASH_ESCAPES or ANSI_QUOTES would run counts too
    ("SELECT 'a\\'; SET @x = 1; -- '", user("x")),
    ('SELECT "a\\"; SET time_zone = \'+01:00\'; -- "', system("time_zone")),
    ("SET @name = 'O\\'Brien'", user("name")),
    ("SET @path = 'C:\\\\temp'", user("path")),
    # --- text the lexer cannot follow
    ("SET @x = 'open", pin(UNCLASSIFIED)),
    ('SET @x = "open', pin(UNCLASSIFIED)),
    ("SET @x = `open", pin(UNCLASSIFIED)),
    ("SET @'open = 1", pin(UNCLASSIFIED)),
    ("SELECT GET_LOCK('a', 1), 'open", pin(UNCLASSIFIED)),
    # ... unless nothing in it could leave state: the server rejects it whole.
    ("SELECT 'open", NO_STATE),
    ("/* unterminated SET @x = 1", NO_STATE),
    # --- case and whitespace
    ("  \n\tset\n@x\t=\n1", user("x")),
    ("SeT SeSsIoN SQL_MODE = ''", system("sql_mode")),
    ("Lock Tables t Read", pin(LOCK_TABLES)),
    ("sElEcT gEt_LoCk('a', 1)", pin(USER_LOCK)),
    # --- words that merely contain keywords
    ("SELECT settings, user_lock, locked FROM t", NO_STATE),
    ("SELECT * FROM handlers", NO_STATE),
    ("SELECT prepared_at FROM jobs", NO_STATE),
    ("SELECT `use` FROM t", NO_STATE),
    ("INSERT INTO xa_log VALUES (1)", NO_STATE),
    ("UPDATE t SET `set` = 1", NO_STATE),
    ("SELECT row_count_estimate, found_rows_total FROM stats", NO_STATE),
    # Keywords are ASCII: no Unicode case mapping makes one (a long s upper-cases to S).
    ("\u017fet @x = 1", NO_STATE),
    ("SELECT @x \u0131NTO @y", NO_STATE),
]


@pytest.mark.parametrize(("sql", "expected"), SPEC, ids=[sql for sql, _ in SPEC])
def test_replay_mode_verdict(sql: str, expected: Verdict) -> None:
    assert Classifier().verdict(sql.encode()) == expected


def test_the_table_is_large_covers_every_reason_and_has_no_duplicates() -> None:
    assert len(SPEC) >= 150
    assert len({sql for sql, _ in SPEC}) == len(SPEC), "duplicate rows"
    assert {expected.reason for _, expected in SPEC} == {
        None,
        TEMPORARY_TABLE,
        LOCK_TABLES,
        GLOBAL_READ_LOCK,
        USER_LOCK,
        FOUND_ROWS,
        PREPARED_STATEMENT,
        HANDLER,
        SET_TRANSACTION,
        XA_TRANSACTION,
        SET_ROLE,
        UNCLASSIFIED,
    }  # SET_VARIABLE and STATEMENT_SIZE are pin mode's


def test_no_state_is_the_very_object_whatever_path_decided_it() -> None:
    """The frontend compares with `is`."""
    classifier = Classifier()
    assert classifier.verdict(b"SELECT 1") is NO_STATE  # the fast path
    assert classifier.verdict(b"SET GLOBAL max_connections = 1") is NO_STATE  # the lexer


def test_the_classifier_takes_keyword_arguments_only() -> None:
    with pytest.raises(TypeError):
        Classifier(True)  # type: ignore[misc]


BYTES_SPEC: list[tuple[bytes, Verdict]] = [
    (b"SET @x = '\xff\xfe'", user("x")),
    ("SET @café = 1".encode(), user("café")),
    ("SET @`Ünï` = 1".encode(), user("ünï")),
    (b"SET @\xff = 1", user("\ufffd")),
    (b"SELECT '\xff; SET @x = 1'", NO_STATE),
    (b"SELECT 1 /* \x80 */; USE shop", SCHEMA),
    (b"SELECT \xc3'; SET @x = 1", pin(UNCLASSIFIED)),  # a broken character keeps its quote
    (b"SET @x = 1\x00", user("x")),
    (b"\x00SET @x = 1", NO_STATE),
]


@pytest.mark.parametrize(("sql", "expected"), BYTES_SPEC)
def test_any_bytes_are_read_as_utf8_with_replacement(sql: bytes, expected: Verdict) -> None:
    assert Classifier().verdict(sql) == expected


# ---------------------------------------------------------------------------------------------
# Pin mode (replay_settings=False) and EXCLUDE_VARIABLE_SETS

LONG_SELECT = "SELECT '" + "x" * (MAX_STATEMENT_SIZE - 9) + "'"  # 16384 bytes
assert len(LONG_SELECT) == MAX_STATEMENT_SIZE

PIN_MODE_SPEC: list[tuple[str, Verdict]] = [
    ("SET sql_mode = ''", pin(SET_VARIABLE)),
    ("SET NAMES utf8mb4", pin(SET_VARIABLE)),
    ("SET @x = 1", pin(SET_VARIABLE)),
    ("SELECT @n := 1", pin(SET_VARIABLE)),
    ("SELECT id INTO @id FROM t", pin(SET_VARIABLE)),
    ("CALL p(@out)", pin(SET_VARIABLE)),
    ("SET SESSION TRANSACTION READ ONLY", pin(SET_VARIABLE)),
    ("SET @a = GET_LOCK('a', 1)", pin(SET_VARIABLE)),
    ("SET GLOBAL max_connections = 1", NO_STATE),
    ("SET TRANSACTION READ ONLY", pin(SET_TRANSACTION)),
    ("SET ROLE r", pin(SET_ROLE)),
    ("USE shop", SCHEMA),
    ("SELECT LAST_INSERT_ID()", READS_INSERT_ID),
    ("SET @x = 1; LOCK TABLES t READ", pin(SET_VARIABLE)),
    ("LOCK TABLES t READ; SET @x = 1", pin(LOCK_TABLES)),
    ("SELECT 1", NO_STATE),
    (LONG_SELECT, NO_STATE),
    (LONG_SELECT + " ", pin(STATEMENT_SIZE)),
]


@pytest.mark.parametrize(("sql", "expected"), PIN_MODE_SPEC, ids=[s[:60] for s, _ in PIN_MODE_SPEC])
def test_pin_mode_pins_on_variables_and_long_texts(sql: str, expected: Verdict) -> None:
    assert Classifier(replay_settings=False).verdict(sql.encode()) == expected


EXCLUDE_VARIABLE_SETS_SPEC: list[tuple[str, Verdict]] = [
    ("SET sql_mode = ''", NO_STATE),
    ("SET NAMES utf8mb4", NO_STATE),
    ("SET @x = 1; SET y = 2", NO_STATE),
    ("SELECT @n := 1", NO_STATE),
    ("SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE", NO_STATE),
    ("SET TRANSACTION READ ONLY", pin(SET_TRANSACTION)),
    ("SET ROLE r", pin(SET_ROLE)),
    ("SET @x = 1; CREATE TEMPORARY TABLE t (a INT)", pin(TEMPORARY_TABLE)),
    ("SET @x = GET_LOCK('a', 1)", pin(USER_LOCK)),
    ("USE shop", SCHEMA),
    ("SET @x = 'open", pin(UNCLASSIFIED)),
    (LONG_SELECT + " ", pin(STATEMENT_SIZE)),
]


@pytest.mark.parametrize(
    ("sql", "expected"),
    EXCLUDE_VARIABLE_SETS_SPEC,
    ids=[s[:60] for s, _ in EXCLUDE_VARIABLE_SETS_SPEC],
)
def test_exclude_variable_sets_lets_variables_through_unreported_but_nothing_else(
    sql: str, expected: Verdict
) -> None:
    classifier = Classifier(replay_settings=False, exclude_variable_sets=True)
    assert classifier.verdict(sql.encode()) == expected


def test_replay_mode_has_no_size_rule_and_ignores_exclude_variable_sets() -> None:
    classifier = Classifier(exclude_variable_sets=True)
    assert classifier.verdict((LONG_SELECT + " ").encode()) is NO_STATE
    assert classifier.verdict(b"SET @x = 1") == user("x")


# ---------------------------------------------------------------------------------------------
# The fast path never hides state, and the classifier never raises


def lexer_verdict(sql: bytes, classifier: Classifier | None = None) -> Verdict:
    """What the classifier decides when the fast path lets everything through."""
    with mock.patch.object(pinning, "might_matter", return_value=True):
        return (classifier or Classifier()).verdict(sql)


def unterminated(sql: bytes) -> bool:
    try:
        list(split_statements(sql.decode(errors="replace")))
    except Unterminated:
        return True
    return False


def assert_fast_path_agrees(sql: bytes) -> None:
    """might_matter may say False only when the lexer finds no state, or finds text it cannot
    follow (an unterminated quote or comment) with nothing in it that could leave state."""
    if might_matter(sql):
        return
    found = lexer_verdict(sql)
    assert found is NO_STATE or (found == pin(UNCLASSIFIED) and unterminated(sql)), (sql, found)
    assert Classifier().verdict(sql) is NO_STATE


@pytest.mark.parametrize(
    "sql", [sql for sql, _ in SPEC] + [s.decode(errors="replace") for s, _ in BYTES_SPEC]
)
def test_might_matter_lets_every_row_with_state_through(sql: str) -> None:
    raw = sql.encode()
    if Classifier().verdict(raw) is not NO_STATE:
        assert might_matter(raw)
    assert_fast_path_agrees(raw)


COMMON_QUERIES = [
    "SELECT id, name FROM users WHERE id = 42",
    "SELECT u.id, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE o.id IN (1, 2)",
    "INSERT INTO orders (user_id, total, note) VALUES (42, 19.99, 'gift; wrap it')",
    "UPDATE users SET name = 'x', updated_at = NOW() WHERE id = 1",
    "DELETE FROM carts WHERE created_at < '2024-01-01 00:00:00'",
    "BEGIN",
    "begin work",
    "START TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "SELECT 1",
    "SHOW TABLES",
    "SELECT COUNT(*) FROM t WHERE note = '@home'",
]


@pytest.mark.parametrize("sql", COMMON_QUERIES)
def test_common_queries_take_the_fast_path(sql: str) -> None:
    assert not might_matter(sql.encode())


# Statements with state as token lists, and their verdict. Words get random case, and random
# blanks and comments go between tokens.
WITH_STATE: list[tuple[list[str], Verdict]] = [
    (["SET", "sql_mode", "=", "''"], system("sql_mode")),
    (["SET", "SESSION", "time_zone", ":=", "'+00:00'"], system("time_zone")),
    (["SET", "@@session.autocommit", "=", "0"], system("autocommit")),
    (["SET", "@X", "=", "1", ",", "GLOBAL", "g", "=", "2", ",", "h", "=", "3"], user("x")),
    (["SET", "NAMES", "utf8mb4", "COLLATE", "utf8mb4_bin"], system(*CHARSET)),
    (["SET", "CHARACTER", "SET", "latin1"], system(*CHARSET)),
    (["SET", "TRANSACTION", "READ", "ONLY"], pin(SET_TRANSACTION)),
    (
        ["SET", "SESSION", "TRANSACTION", "ISOLATION", "LEVEL", "READ", "COMMITTED"],
        system("tx_isolation"),
    ),
    (["SET", "ROLE", "r"], pin(SET_ROLE)),
    (["SET", "STATEMENT", "a", "=", "1", "FOR", "USE", "db"], SCHEMA),
    (["USE", "shop"], SCHEMA),
    (["SELECT", "LAST_INSERT_ID", "(", ")"], READS_INSERT_ID),
    (["SELECT", "@@identity"], READS_INSERT_ID),
    (["SELECT", "LAST_INSERT_ID", "(", "5", ")"], pin(FOUND_ROWS)),
    (["SELECT", "SQL_CALC_FOUND_ROWS", "*", "FROM", "t"], pin(FOUND_ROWS)),
    (["SELECT", "ROW_COUNT", "(", ")"], pin(FOUND_ROWS)),
    (["SELECT", "GET_LOCK", "(", "'a'", ",", "1", ")"], pin(USER_LOCK)),
    (["SELECT", "@n", ":=", "@n", "+", "1", "FROM", "t"], user("n")),
    (["SELECT", "1", "INTO", "@a", ",", "@b"], user("a", "b")),
    (["DO", "@x", ":=", "1"], user("x")),
    (["CALL", "p", "(", "@out", ")"], user("out")),
    (["CREATE", "TEMPORARY", "TABLE", "t", "(", "a", "INT", ")"], pin(TEMPORARY_TABLE)),
    (["LOCK", "TABLES", "t", "READ"], pin(LOCK_TABLES)),
    (["BACKUP", "LOCK", "t"], pin(LOCK_TABLES)),
    (["FLUSH", "TABLES", "WITH", "READ", "LOCK"], pin(GLOBAL_READ_LOCK)),
    (["PREPARE", "s", "FROM", "'SELECT 1'"], pin(PREPARED_STATEMENT)),
    (["DEALLOCATE", "PREPARE", "s"], pin(PREPARED_STATEMENT)),
    (["HANDLER", "t", "OPEN"], pin(HANDLER)),
    (["XA", "START", "'x'"], pin(XA_TRANSACTION)),
    (["BEGIN", "NOT", "ATOMIC", "SELECT", "1"], pin(UNCLASSIFIED)),
    (["lbl", ":", "LOOP", "SELECT", "1"], pin(UNCLASSIFIED)),
    (["IF", "1", "THEN", "SELECT", "1"], pin(UNCLASSIFIED)),
]

WITHOUT_STATE = [
    "SELECT 1",
    "SELECT * FROM t WHERE note = 'a;b'",
    "UPDATE t SET settings = 'SET @x = 1'",
    "INSERT INTO t VALUES ('it''s', \"a\"\"b\")",
    "SELECT `set`, `use` FROM `lock`",
    "SELECT 'a\\\\'",
    "SELECT @x, @@sql_mode",
    "SET GLOBAL max_connections = 100",
    "BEGIN",
    "COMMIT",
]

# Only what MySQL skips between tokens: blanks, comments, empty executable comments.
GAP = st.lists(
    st.sampled_from(
        [" ", "  ", "\t", "\n", "\r\n", "\f", "/* c */", "/**/", "/*!*/", "-- c\n", "#c\n", "--\n"]
    ),
    min_size=1,
    max_size=3,
).map("".join)
LEADING = st.lists(
    st.sampled_from(["", " ", "\n", "/* lead */", "-- lead\n", "# lead\n"]), max_size=2
).map("".join)


@st.composite
def random_case(draw: st.DrawFn, word: str) -> str:
    if word[:1] in ("'", "`"):
        return word
    flips = draw(st.lists(st.booleans(), min_size=len(word), max_size=len(word)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(word, flips, strict=True))


@st.composite
def text_with_state(draw: st.DrawFn) -> tuple[str, Verdict]:
    tokens, expected = draw(st.sampled_from(WITH_STATE))
    words = [draw(random_case(token)) for token in tokens]
    statement = words[0] + "".join(draw(GAP) + word for word in words[1:])
    if draw(st.booleans()):  # the server runs an executable comment's content
        opening = draw(st.sampled_from(["/*!", "/*!40101", "/*M!", "/*M!100400"]))
        statement = f"{opening} {statement} */"
    before = draw(st.lists(st.sampled_from(WITHOUT_STATE), max_size=3))
    after = draw(st.lists(st.sampled_from(WITHOUT_STATE), max_size=2))
    parts = [*before, statement, *after]
    text = draw(LEADING) + parts[0]
    for part in parts[1:]:
        text += draw(st.sampled_from(["", " "])) + ";" + draw(LEADING) + part
    if draw(st.booleans()):
        text += ";" + draw(LEADING)
    return text, expected


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text_with_state())
def test_state_is_found_whatever_the_case_blanks_comments_and_neighbours(
    case: tuple[str, Verdict],
) -> None:
    sql, expected = case
    raw = sql.encode()
    assert lexer_verdict(raw) == expected  # the generator builds what it claims
    assert might_matter(raw)
    assert Classifier().verdict(raw) == expected


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(WITHOUT_STATE), min_size=1, max_size=4), LEADING)
def test_statements_without_state_leave_none_together(statements: list[str], leading: str) -> None:
    assert Classifier().verdict((leading + "; ".join(statements)).encode()) is NO_STATE


FRAGMENTS = [
    *[
        "SET",
        "set",
        "USE",
        "use",
        "LOCK",
        "TABLES",
        "FLUSH",
        "WITH",
        "READ",
        "FOR",
        "EXPORT",
        "BEGIN",
        "WORK",
        "NOT",
        "ATOMIC",
        "CREATE",
        "TEMPORARY",
        "TABLE",
        "PROCEDURE",
        "DEFINER",
        "TRIGGER",
        "EACH",
        "ROW",
        "END",
        "IF",
        "LOOP",
        "SELECT",
        "INTO",
        "DO",
        "CALL",
        "STATEMENT",
        "GLOBAL",
        "SESSION",
        "LOCAL",
        "TRANSACTION",
        "NAMES",
        "CHARACTER",
        "ROLE",
        "PASSWORD",
        "XA",
        "HANDLER",
        "PREPARE",
        "EXECUTE",
        "DROP",
        "GET",
        "DIAGNOSTICS",
        "LOAD",
        "SQL_CALC_FOUND_ROWS",
        "GET_LOCK",
        "FOUND_ROWS",
        "LAST_INSERT_ID",
        "ROW_COUNT",
        "@x",
        "@X",
        "@@identity",
        "@@session.sql_mode",
        "@@global.x",
        "lbl:",
        "_utf8mb4",
    ],
    *["@'a", "@`b`", '@"c"', ":=", "=", ",", ".", "(", ")", ";", ":", "\\", "1", "x"],
    *["'", '"', "`", "/*", "*/", "/*!", "/*M!", "/*!50000", "--", "#", "X'", "N'"],
    *[
        " ",
        "\n",
        "-- \n",
        "\t",
        "'it''s'",
        "'a\\'",
        "\u017fet",
        "\u0131f",
        "\ufb02ush",
        "\u212a",
        "é",
    ],
]


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)),
        max_size=24,
    ),
    st.lists(st.sampled_from(["", " ", "\n"]), min_size=24, max_size=24),
)
def test_any_text_is_classified_without_raising_and_the_fast_path_agrees(
    fragments: list[str], separators: list[str]
) -> None:
    sql = "".join(f + s for f, s in zip(fragments, separators, strict=False)).encode()
    with mock.patch.object(pinning, "log") as log:
        for classifier in (
            Classifier(),
            Classifier(replay_settings=False),
            Classifier(replay_settings=False, exclude_variable_sets=True),
        ):
            classifier.verdict(sql)
            lexer_verdict(sql, classifier)
        assert_fast_path_agrees(sql)
    assert not log.exception.called, "the classifier raised"


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from([sql for sql, _ in SPEC]),
    st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(FRAGMENTS)), max_size=3),
)
def test_table_rows_with_fragments_spliced_in_are_classified_and_the_fast_path_agrees(
    sql: str, insertions: list[tuple[int, str]]
) -> None:
    for position, fragment in insertions:
        at = position % (len(sql) + 1)
        sql = sql[:at] + fragment + sql[at:]
    with mock.patch.object(pinning, "log") as log:
        assert_fast_path_agrees(sql.encode())
    assert not log.exception.called, "the classifier raised"


def test_a_bug_in_the_classifier_costs_a_pin_not_the_query() -> None:
    with (
        mock.patch.object(pinning, "_statement", side_effect=RuntimeError("bug")),
        mock.patch.object(pinning, "log") as log,
    ):
        assert Classifier().verdict(b"SET @x = 1") == pin(UNCLASSIFIED)
    log.exception.assert_called_once()
