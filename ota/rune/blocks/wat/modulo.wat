;; modulo.wat: every element's remainder after division by `modulus`, like C's fmod: the result
;; has the dividend's sign and is smaller in size than the modulus (-1 % 360 = -1, 725 % 360 = 5,
;; 370.5 % 360 = 10.5). The work is done in f64 and exactly; the output has the input's type and
;; dimensions (integer types truncate back toward zero, NaN and inf give NaN for float types).
;; Arg: modulus, a non-zero number, 1 when absent.

  (data (i32.const 1024) "modulo\00")
  (data (i32.const 1040) "modulo: modulus must be a non-zero number\00")
  (data (i32.const 1088) "modulus\00")

  (global $modulus (mut f64) (f64.const 1))

  (func $fleet_configure (export "fleet_configure") (param $args i32) (param $count i32)
                         (result i32)
    (local $rec i32) (local $m f64)
    (local.set $rec (call $p_find_arg (local.get $args) (local.get $count) (i32.const 1088)))
    (if (local.get $rec)
      (then
        (if (i32.eqz (call $p_arg_is_number (local.get $rec)))
          (then (return (call $p_fail_z (i32.const 1040)))))
        (local.set $m (call $p_arg_number (local.get $rec)))
        (if (i32.or (f64.eq (local.get $m) (f64.const 0)) (f64.ne (local.get $m) (local.get $m)))
          (then (return (call $p_fail_z (i32.const 1040)))))
        (global.set $modulus (local.get $m))))
    (call $p_ok (i32.const 0) (i32.const 0)))

  ;; floor(log2(x)) for finite x > 0, subnormals included.
  (func $ilogb (param $x f64) (result i32)
    (local $e i32)
    (local.set $e (i32.wrap_i64 (i64.shr_u (i64.reinterpret_f64 (local.get $x)) (i64.const 52))))
    (if (i32.eqz (local.get $e))
      (then (return (i32.sub (call $ilogb (f64.mul (local.get $x) (f64.const 18446744073709551616)))
                             (i32.const 64)))))
    (i32.sub (local.get $e) (i32.const 1023)))

  ;; fmod(x, m), exact: repeatedly subtract m * 2^j, the largest such multiple not above |x|.
  ;; Each step is exact by Sterbenz's lemma (t <= |x| < 2t).
  (func $fmod (param $x f64) (param $m f64) (result f64)
    (local $ax f64) (local $am f64) (local $t f64)
    (if (i32.or (f64.ne (local.get $x) (local.get $x)) (f64.ne (local.get $m) (local.get $m)))
      (then (return (f64.const nan))))
    (local.set $ax (f64.abs (local.get $x)))
    (local.set $am (f64.abs (local.get $m)))
    (if (i32.or (f64.eq (local.get $ax) (f64.const inf)) (f64.eq (local.get $am) (f64.const 0)))
      (then (return (f64.const nan))))
    (if (f64.lt (local.get $ax) (local.get $am)) (then (return (local.get $x))))
    (block $done
      (loop $step
        (br_if $done (f64.lt (local.get $ax) (local.get $am)))
        (local.set $t (call $p_ldexp (local.get $am)
                        (i32.sub (call $ilogb (local.get $ax)) (call $ilogb (local.get $am)))))
        (if (f64.gt (local.get $t) (local.get $ax))
          (then (local.set $t (f64.mul (local.get $t) (f64.const 0.5)))))
        (local.set $ax (f64.sub (local.get $ax) (local.get $t)))
        (br $step)))
    (f64.copysign (local.get $ax) (local.get $x)))

  (func $fleet_transform (export "fleet_transform") (param $inputs i32) (param $count i32)
                         (result i32)
    (local $r i32) (local $t i32) (local $n i32) (local $src i32) (local $len i32)
    (local $data i32) (local $desc i32) (local $i i32)
    (local.set $r (call $p_expect_one (local.get $inputs) (local.get $count) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $r (call $p_expect_numeric (local.get $inputs) (i32.const 1024)))
    (if (local.get $r) (then (return (local.get $r))))
    (local.set $t (call $p_type (local.get $inputs)))
    (local.set $n (call $p_count (local.get $inputs)))
    (local.set $src (call $p_data (local.get $inputs)))
    (local.set $len (call $p_data_len (local.get $inputs)))
    (local.set $data (call $p_out (local.get $len)))
    (if (i32.eqz (local.get $data)) (then (return (call $p_oom))))
    (local.set $desc (call $p_new_desc (local.get $t) (call $p_rank (local.get $inputs))
                                       (local.get $data) (local.get $len)))
    (if (i32.eqz (local.get $desc)) (then (return (call $p_oom))))
    (call $p_copy_dims (local.get $desc) (local.get $inputs))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (call $p_store (local.get $t) (local.get $data) (local.get $i)
          (call $fmod (call $p_load (local.get $t) (local.get $src) (local.get $i))
                      (global.get $modulus)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $p_ok (local.get $desc) (i32.const 1)))
