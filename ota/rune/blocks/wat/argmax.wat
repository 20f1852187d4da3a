;; argmax.wat: the position of the largest element of a numeric tensor, counted over the
;; flattened elements, as u32 with dimensions [1]. The first of equal maxima wins, NaN is never
;; chosen, and a tensor of only NaN gives 0. u64/i64 values are compared exactly. No args.

  (data (i32.const 1024) "argmax\00")
  (data (i32.const 1040) "argmax: the input has no elements\00")

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $data i32)
    (local $desc i32) (local $i i32) (local $best i32) (local $found i32)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $r (call $p_expect_numeric (local.get $inputs) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    (if (i32.eqz (local.get $n)) (then (return (call $p_fail_z (i32.const 1040)))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.eqz (call $p_is_nan (local.get $t) (local.get $src) (local.get $i)))
          (then
            (if (i32.or (i32.eqz (local.get $found))
                        (call $p_gt (local.get $t) (local.get $src) (local.get $i) (local.get $best)))
              (then
                (local.set $best (local.get $i))
                (local.set $found (i32.const 1))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $data (call $p_out (i32.const 4)))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (i32.store (local.get $data) (local.get $best))
    (local.set $desc (call $p_new_desc (i32.const 5) (i32.const 1) (local.get $data) (i32.const 4)))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_set_dim (local.get $desc) (i32.const 0) (i32.const 1))
    (call $p_ok (local.get $desc) (i32.const 1)))
