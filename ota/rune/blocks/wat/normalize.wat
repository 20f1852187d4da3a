;; normalize.wat: rescales a numeric tensor onto [0, 1] as f32 with the same dimensions:
;; (x - min) / (max - min), where min and max ignore NaN elements and NaN elements stay NaN.
;; When there is no spread (max == min, or every element is NaN) every output is 0.
;; The arithmetic is f64, rounded to f32 at the end. No args.

  (data (i32.const 1024) "normalize\00")

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $data i32)
    (local $desc i32) (local $i i32) (local $v f64) (local $min f64) (local $max f64)
    (local $range f64)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $r (call $p_expect_numeric (local.get $inputs) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    (if (i64.gt_u (i64.shl (i64.extend_i32_u (local.get $n)) (i64.const 2)) (i64.const 0xFFFFFFFF))
      (then (return (call $p_oom))))
    (local.set $data (call $p_out (i32.shl (local.get $n) (i32.const 2))))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (i32.const 7) (call $p_rank (local.get $inputs))
                                       (local.get $data) (i32.shl (local.get $n) (i32.const 2))))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_copy_dims (local.get $desc) (local.get $inputs))
    ;; min and max over the non-NaN elements (NaN compares false, so it never wins)
    (local.set $min (f64.const inf))
    (local.set $max (f64.const -inf))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $v (call $p_load (local.get $t) (local.get $src) (local.get $i)))
        (if (f64.lt (local.get $v) (local.get $min)) (then (local.set $min (local.get $v))))
        (if (f64.gt (local.get $v) (local.get $max)) (then (local.set $max (local.get $v))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.set $range (f64.sub (local.get $max) (local.get $min)))
    (local.set $i (i32.const 0))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (f64.gt (local.get $range) (f64.const 0))
          (then
            (local.set $v (f64.div
              (f64.sub (call $p_load (local.get $t) (local.get $src) (local.get $i)) (local.get $min))
              (local.get $range))))
          (else (local.set $v (f64.const 0))))
        (f32.store (i32.add (local.get $data) (i32.shl (local.get $i) (i32.const 2)))
                   (f32.demote_f64 (local.get $v)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $p_ok (local.get $desc) (i32.const 1)))
