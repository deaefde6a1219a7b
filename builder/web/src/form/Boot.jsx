import { useForm } from './context.js';
import { Text, Check, Select, Lines } from './Fields.jsx';

// kiln's extras around the boot: how the VM boots (direct kernel or firmware, UEFI), the boot
// command typed at its screen, the cloud-init seed, and whether it has a console.
export default function Boot({ p, vm, kind }) {
  const { set } = useForm();
  const efi = vm.efiFirmware && typeof vm.efiFirmware === 'object' ? vm.efiFirmware : null;
  return (
    <>
      <div className="row">
        <Select label="boot" path={[...p, 'boot']} options={['auto', 'direct', 'firmware']} allowEmpty />
        <Check label="UEFI (efiFirmware)" path={[...p, 'efiFirmware']}
          onToggle={(on) => set([...p, 'efiFirmware'], on ? (efi ?? {}) : undefined)} />
        {efi && <Check label="Secure Boot" path={[...p, 'efiFirmware', 'secureBoot']} />}
        <Check label="invisible (no console)" path={[...p, 'invisible']} />
      </div>
      <div className="row">
        <Lines label="boot command (one string a line)" path={[...p, 'bootCommand']} />
        <Text label="boot wait" path={[...p, 'bootWait']} placeholder="10s" />
        <Text label="key interval" path={[...p, 'bootKeyInterval']} placeholder="100ms" />
      </div>
      <div className="row">
        {/* url and file sources have this box in Source, where it matters most. */}
        {kind !== 'url' && kind !== 'file' && (
          <Check label="cloud-init seed" path={[...p, 'cloudInit']}
            onToggle={(on) => set([...p, 'cloudInit'], on ? (vm.cloudInit ?? {}) : undefined)} />
        )}
        {vm.cloudInit != null && <Text label="cloud-init user data" multiline path={[...p, 'cloudInit', 'userData']} />}
      </div>
    </>
  );
}
