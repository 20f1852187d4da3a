;; most_confident_indices.wat: the positions of the `count` largest values of a 1-D numeric
;; tensor (dimensions like [N], [1, N] or [1, N, 1]), largest first, as u32 with dimensions
;; [count]. Equal values keep their order (the lower index comes first). NaN in the input, a
;; count above the number of values, or an input that is not 1-D is an error.
;; Arg: count, a whole number of at least 1, 1 when absent.

  (data (i32.const 1024) "most_confident_indices\00")
  (data (i32.const 1056) "most_confident_indices: count must be a whole number of at least 1\00")
  (data (i32.const 1136) "most_confident_indices: input must be 1-D (dimensions like [1, N])\00")
  (data (i32.const 1216) "most_confident_indices: count \00")
  (data (i32.const 1256) " is more than the \00")
  (data (i32.const 1280) " values of the input\00")
  (data (i32.const 1312) "most_confident_indices: the input holds NaN at index \00")
  (data (i32.const 1376) "count\00")

  (global $want (mut f64) (f64.const 1))

  (func $fleet_configure (export "fleet_configure") (param $args i32) (param $count i32)
                         (result i32)
    (local $rec i32) (local $v f64)
    (local.set $rec (call $p_find_arg (local.get $args) (local.get $count) (i32.const 1376)))
    (if (local.get $rec)
      (then
        (if (i32.eqz (call $p_arg_is_number (local.get $rec)))
          (then (return (call $p_fail_z (i32.const 1056)))))
        (local.set $v (call $p_arg_number (local.get $rec)))
        ;; whole, at least 1 and finite (NaN fails every comparison)
        (if (i32.eqz (i32.and (i32.and (f64.ge (local.get $v) (f64.const 1))
                                       (f64.eq (f64.trunc (local.get $v)) (local.get $v)))
                              (f64.lt (local.get $v) (f64.const inf))))
          (then (return (call $p_fail_z (i32.const 1056)))))
        (global.set $want (local.get $v))))
    (call $p_ok (i32.const 0) (i32.const 0)))

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $data i32)
    (local $desc i32) (local $i i32) (local $j i32) (local $k i32) (local $s i32)
    (local $nonone i32) (local $d i32) (local $best i32) (local $prev i32) (local $ok i32)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $r (call $p_expect_numeric (local.get $inputs) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    ;; 1-D once leading and trailing 1s are dropped <=> at most one dimension differs from 1
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (call $p_rank (local.get $inputs))))
        (local.set $d (call $p_dim (local.get $inputs) (local.get $i)))
        (if (i32.ne (local.get $d) (i32.const 1))
          (then (local.set $nonone (i32.add (local.get $nonone) (i32.const 1)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (i32.gt_u (local.get $nonone) (i32.const 1))
      (then (return (call $p_fail_z (i32.const 1136)))))
    (if (f64.gt (global.get $want) (f64.convert_i32_u (local.get $n)))
      (then
        (call $p_msg_begin)
        (call $p_msg_z (i32.const 1216))
        (call $p_msg_f (global.get $want))
        (call $p_msg_z (i32.const 1256))
        (call $p_msg_u (i64.extend_i32_u (local.get $n)))
        (call $p_msg_z (i32.const 1280))
        (return (call $p_msg_fail))))
    (local.set $i (i32.const 0))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (call $p_is_nan (local.get $t) (local.get $src) (local.get $i))
          (then
            (call $p_msg_begin)
            (call $p_msg_z (i32.const 1312))
            (call $p_msg_u (i64.extend_i32_u (local.get $i)))
            (return (call $p_msg_fail))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $k (i32.trunc_f64_u (global.get $want)))
    (local.set $data (call $p_out (i32.shl (local.get $k) (i32.const 2))))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (i32.const 5) (i32.const 1) (local.get $data)
                                       (i32.shl (local.get $k) (i32.const 2))))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_set_dim (local.get $desc) (i32.const 0) (local.get $k))
    ;; Pick the k first elements of the order (value descending, index ascending): each pick is
    ;; the best element that comes after the previous pick in that order.
    (local.set $prev (i32.const -1))
    (block $picked
      (loop $pick
        (br_if $picked (i32.ge_u (local.get $s) (local.get $k)))
        (local.set $best (i32.const -1))
        (local.set $j (i32.const 0))
        (block $scanned
          (loop $scan
            (br_if $scanned (i32.ge_u (local.get $j) (local.get $n)))
            (local.set $ok (i32.const 1))
            (if (i32.ge_s (local.get $prev) (i32.const 0))
              (then
                (local.set $ok
                  (i32.or (call $p_gt (local.get $t) (local.get $src) (local.get $prev) (local.get $j))
                          (i32.and
                            (i32.eqz (call $p_gt (local.get $t) (local.get $src)
                                                 (local.get $j) (local.get $prev)))
                            (i32.gt_u (local.get $j) (local.get $prev)))))))
            (if (local.get $ok)
              (then
                (if (i32.or (i32.lt_s (local.get $best) (i32.const 0))
                            (call $p_gt (local.get $t) (local.get $src) (local.get $j) (local.get $best)))
                  (then (local.set $best (local.get $j))))))
            (local.set $j (i32.add (local.get $j) (i32.const 1)))
            (br $scan)))
        (i32.store (i32.add (local.get $data) (i32.shl (local.get $s) (i32.const 2)))
                   (local.get $best))
        (local.set $prev (local.get $best))
        (local.set $s (i32.add (local.get $s) (i32.const 1)))
        (br $pick)))
    (call $p_ok (local.get $desc) (i32.const 1)))
