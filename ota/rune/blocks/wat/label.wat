;; label.wat: looks up a word for each index of its input, giving a utf8 tensor [n] (n = the
;; number of input elements, flattened). The words come from the `wordlist` arg (or `labels`,
;; which the host passes the same way: one word per line): surrounding whitespace of the whole
;; text is trimmed, then each line is a word (one trailing "\r" dropped; blank lines inside count
;; as words). The words are copied into the block's own memory at configure time.
;; Indices may be any integer type, or f32/f64 holding whole non-negative numbers; an index past
;; the last word is an error.

  (data (i32.const 1024) "label\00")
  (data (i32.const 1040) "label: needs a wordlist or labels arg\00")
  (data (i32.const 1088) "label: the wordlist is empty\00")
  (data (i32.const 1120) "label: no wordlist or labels arg was configured\00")
  (data (i32.const 1176) "label: index \00")
  (data (i32.const 1192) " is not a whole non-negative number\00")
  (data (i32.const 1232) " is out of range for \00")
  (data (i32.const 1256) " labels\00")
  (data (i32.const 1264) "wordlist\00")
  (data (i32.const 1280) "labels\00")
  (data (i32.const 1296) "label: the wordlist lies outside the block's memory\00")
  (data (i32.const 1352) " label\00")

  (global $n_labels (mut i32) (i32.const 0))
  ;; $n_labels entries of (u32 ptr, u32 len), pointing into the kept copy of the text
  (global $table (mut i32) (i32.const 0))

  ;; Length of the whitespace character starting at p (0 if none), reading no further than end.
  ;; Whitespace is Unicode White_Space, as Rust's str::trim uses it.
  (func $ws_len (param $p i32) (param $end i32) (result i32)
    (local $avail i32) (local $b0 i32) (local $b1 i32) (local $b2 i32)
    (local.set $avail (i32.sub (local.get $end) (local.get $p)))
    (if (i32.le_s (local.get $avail) (i32.const 0)) (then (return (i32.const 0))))
    (local.set $b0 (i32.load8_u (local.get $p)))
    (if (i32.or (i32.eq (local.get $b0) (i32.const 32))
                (i32.le_u (i32.sub (local.get $b0) (i32.const 9)) (i32.const 4)))
      (then (return (i32.const 1))))
    (if (i32.lt_s (local.get $avail) (i32.const 2)) (then (return (i32.const 0))))
    (local.set $b1 (i32.load8_u offset=1 (local.get $p)))
    (if (i32.and (i32.eq (local.get $b0) (i32.const 0xC2))
                 (i32.or (i32.eq (local.get $b1) (i32.const 0x85))
                         (i32.eq (local.get $b1) (i32.const 0xA0))))
      (then (return (i32.const 2))))
    (if (i32.lt_s (local.get $avail) (i32.const 3)) (then (return (i32.const 0))))
    (local.set $b2 (i32.load8_u offset=2 (local.get $p)))
    ;; U+1680
    (if (i32.and (i32.eq (local.get $b0) (i32.const 0xE1))
                 (i32.and (i32.eq (local.get $b1) (i32.const 0x9A))
                          (i32.eq (local.get $b2) (i32.const 0x80))))
      (then (return (i32.const 3))))
    ;; U+2000..U+200A, U+2028, U+2029, U+202F
    (if (i32.and (i32.and (i32.eq (local.get $b0) (i32.const 0xE2))
                          (i32.eq (local.get $b1) (i32.const 0x80)))
                 (i32.or (i32.le_u (i32.sub (local.get $b2) (i32.const 0x80)) (i32.const 0x0A))
                         (i32.or (i32.eq (local.get $b2) (i32.const 0xAF))
                                 (i32.le_u (i32.sub (local.get $b2) (i32.const 0xA8))
                                           (i32.const 1)))))
      (then (return (i32.const 3))))
    ;; U+205F
    (if (i32.and (i32.eq (local.get $b0) (i32.const 0xE2))
                 (i32.and (i32.eq (local.get $b1) (i32.const 0x81))
                          (i32.eq (local.get $b2) (i32.const 0x9F))))
      (then (return (i32.const 3))))
    ;; U+3000
    (if (i32.and (i32.eq (local.get $b0) (i32.const 0xE3))
                 (i32.and (i32.eq (local.get $b1) (i32.const 0x80))
                          (i32.eq (local.get $b2) (i32.const 0x80))))
      (then (return (i32.const 3))))
    (i32.const 0))

  ;; Record word number $i as [a, b), less one trailing "\r".
  (func $add_word (param $i i32) (param $a i32) (param $b i32)
    (local $entry i32)
    (if (i32.gt_u (local.get $b) (local.get $a))
      (then
        (if (i32.eq (i32.load8_u (i32.sub (local.get $b) (i32.const 1))) (i32.const 13))
          (then (local.set $b (i32.sub (local.get $b) (i32.const 1)))))))
    (local.set $entry (i32.add (global.get $table) (i32.shl (local.get $i) (i32.const 3))))
    (i32.store (local.get $entry) (local.get $a))
    (i32.store offset=4 (local.get $entry) (i32.sub (local.get $b) (local.get $a))))

  (func $fleet_configure (export "fleet_configure") (param $args i32) (param $count i32)
                         (result i32)
    (local $rec i32) (local $s i32) (local $e i32) (local $k i32) (local $n i32) (local $q i32)
    (local $text i32) (local $len i32) (local $table i32) (local $start i32) (local $w i32)
    (local.set $rec (call $p_find_arg (local.get $args) (local.get $count) (i32.const 1264)))
    (if (i32.eqz (local.get $rec))
      (then (local.set $rec (call $p_find_arg (local.get $args) (local.get $count)
                                              (i32.const 1280)))))
    (if (i32.eqz (local.get $rec)) (then (return (call $p_fail_z (i32.const 1040)))))
    (local.set $s (call $p_arg_value (local.get $rec)))
    (if (i32.eqz (call $p_in_mem (local.get $s) (call $p_arg_value_len (local.get $rec))))
      (then (return (call $p_fail_z (i32.const 1296)))))
    (local.set $e (i32.add (local.get $s) (call $p_arg_value_len (local.get $rec))))
    ;; trim the front
    (block $front_done
      (loop $front
        (local.set $k (call $ws_len (local.get $s) (local.get $e)))
        (br_if $front_done (i32.eqz (local.get $k)))
        (local.set $s (i32.add (local.get $s) (local.get $k)))
        (br $front)))
    ;; trim the back: a whitespace character of 1, 2 or 3 bytes ending at e
    (block $back_done
      (loop $back
        (local.set $k (i32.const 1))
        (block $found
          (loop $try
            (br_if $back_done (i32.gt_u (local.get $k) (i32.const 3)))
            (if (i32.ge_u (i32.sub (local.get $e) (local.get $s)) (local.get $k))
              (then
                (br_if $found (i32.eq (call $ws_len (i32.sub (local.get $e) (local.get $k))
                                                    (local.get $e))
                                      (local.get $k)))))
            (local.set $k (i32.add (local.get $k) (i32.const 1)))
            (br $try)))
        (local.set $e (i32.sub (local.get $e) (local.get $k)))
        (br $back)))
    (local.set $len (i32.sub (local.get $e) (local.get $s)))
    (if (i32.eqz (local.get $len)) (then (return (call $p_fail_z (i32.const 1088)))))
    ;; one word per line
    (local.set $n (i32.const 1))
    (local.set $q (local.get $s))
    (block $counted
      (loop $count_lines
        (br_if $counted (i32.ge_u (local.get $q) (local.get $e)))
        (if (i32.eq (i32.load8_u (local.get $q)) (i32.const 10))
          (then (local.set $n (i32.add (local.get $n) (i32.const 1)))))
        (local.set $q (i32.add (local.get $q) (i32.const 1)))
        (br $count_lines)))
    (local.set $table (call $p_keep (i32.shl (local.get $n) (i32.const 3))))
    (if (i32.eqz (local.get $table)) (then (return (call $p_oom))))
    (local.set $text (call $p_keep (local.get $len)))
    (if (i32.eqz (local.get $text)) (then (return (call $p_oom))))
    (memory.copy (local.get $text) (local.get $s) (local.get $len))
    (global.set $table (local.get $table))
    (local.set $e (i32.add (local.get $text) (local.get $len)))
    (local.set $start (local.get $text))
    (local.set $q (local.get $text))
    (block $split
      (loop $scan
        (br_if $split (i32.ge_u (local.get $q) (local.get $e)))
        (if (i32.eq (i32.load8_u (local.get $q)) (i32.const 10))
          (then
            (call $add_word (local.get $w) (local.get $start) (local.get $q))
            (local.set $w (i32.add (local.get $w) (i32.const 1)))
            (local.set $start (i32.add (local.get $q) (i32.const 1)))))
        (local.set $q (i32.add (local.get $q) (i32.const 1)))
        (br $scan)))
    (call $add_word (local.get $w) (local.get $start) (local.get $e))
    (global.set $n_labels (local.get $n))
    (call $p_ok (i32.const 0) (i32.const 0)))

  ;; "label: index <v> is out of range for <n> labels" into the result; returns -1.
  (func $out_of_range_tail (result i64)
    (call $p_msg_z (i32.const 1232))
    (call $p_msg_u (i64.extend_i32_u (global.get $n_labels)))
    (if (i32.eq (global.get $n_labels) (i32.const 1))
      (then (call $p_msg_z (i32.const 1352)))
      (else (call $p_msg_z (i32.const 1256))))
    (drop (call $p_msg_fail))
    (i64.const -1))

  (func $not_whole_tail (result i64)
    (call $p_msg_z (i32.const 1192))
    (drop (call $p_msg_fail))
    (i64.const -1))

  ;; Element i as a word number below $n_labels, or -1 after writing the failure result.
  (func $index (param $t i32) (param $src i32) (param $i i32) (result i64)
    (local $v f64) (local $x i64)
    (if (call $p_is_float (local.get $t))
      (then
        (local.set $v (call $p_load (local.get $t) (local.get $src) (local.get $i)))
        (if (i32.eqz (i32.and (i32.and (f64.ge (local.get $v) (f64.const 0))
                                       (f64.lt (local.get $v) (f64.const inf)))
                              (f64.eq (f64.trunc (local.get $v)) (local.get $v))))
          (then
            (call $p_msg_begin)
            (call $p_msg_z (i32.const 1176))
            (call $p_msg_f (local.get $v))
            (return (call $not_whole_tail))))
        (if (f64.ge (local.get $v) (f64.convert_i32_u (global.get $n_labels)))
          (then
            (call $p_msg_begin)
            (call $p_msg_z (i32.const 1176))
            (call $p_msg_f (local.get $v))
            (return (call $out_of_range_tail))))
        (return (i64.trunc_f64_u (local.get $v)))))
    (local.set $x (call $p_load_i64 (local.get $t) (local.get $src) (local.get $i)))
    (if (i32.eq (local.get $t) (i32.const 8))
      (then
        (if (i64.ge_u (local.get $x) (i64.extend_i32_u (global.get $n_labels)))
          (then
            (call $p_msg_begin)
            (call $p_msg_z (i32.const 1176))
            (call $p_msg_u (local.get $x))
            (return (call $out_of_range_tail))))
        (return (local.get $x))))
    (if (i64.lt_s (local.get $x) (i64.const 0))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (i32.const 1176))
        (call $p_msg_i (local.get $x))
        (return (call $not_whole_tail))))
    (if (i64.ge_s (local.get $x) (i64.extend_i32_u (global.get $n_labels)))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (i32.const 1176))
        (call $p_msg_i (local.get $x))
        (return (call $out_of_range_tail))))
    (local.get $x))

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $data i32)
    (local $desc i32) (local $i i32) (local $idx i64) (local $total i64) (local $entry i32)
    (local $wlen i32) (local $p i32)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (if (i32.eqz (global.get $n_labels)) (then (return (call $p_fail_z (i32.const 1120)))))
    (local.set $r (call $p_expect_numeric (local.get $inputs) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    ;; pass 1: check every index and add up the output size
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $idx (call $index (local.get $t) (local.get $src) (local.get $i)))
        (if (i64.lt_s (local.get $idx) (i64.const 0)) (then (return (i32.const 8))))
        (local.set $entry (i32.add (global.get $table)
                                   (i32.shl (i32.wrap_i64 (local.get $idx)) (i32.const 3))))
        (local.set $total (i64.add (local.get $total)
          (i64.add (i64.const 4) (i64.extend_i32_u (i32.load offset=4 (local.get $entry))))))
        (if (i64.gt_u (local.get $total) (i64.const 0xFFFFFFF0)) (then (return (call $p_oom))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $data (call $p_out (i32.wrap_i64 (local.get $total))))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (i32.const 11) (i32.const 1) (local.get $data)
                                       (i32.wrap_i64 (local.get $total))))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_set_dim (local.get $desc) (i32.const 0) (local.get $n))
    ;; pass 2: write u32 length + bytes for each element
    (local.set $p (local.get $data))
    (local.set $i (i32.const 0))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $entry (i32.add (global.get $table)
          (i32.shl (i32.wrap_i64 (call $index (local.get $t) (local.get $src) (local.get $i)))
                   (i32.const 3))))
        (local.set $wlen (i32.load offset=4 (local.get $entry)))
        (i32.store (local.get $p) (local.get $wlen))
        (memory.copy (i32.add (local.get $p) (i32.const 4)) (i32.load (local.get $entry))
                     (local.get $wlen))
        (local.set $p (i32.add (local.get $p) (i32.add (i32.const 4) (local.get $wlen))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $p_ok (local.get $desc) (i32.const 1)))
